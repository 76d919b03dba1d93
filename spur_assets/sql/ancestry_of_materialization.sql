-- The whole upstream chain of one materialization, itself at depth 0, each
-- ancestor once at its shortest depth. Parameter: $materialization_id.
WITH RECURSIVE chain(materialization_id, depth, via) AS (
    SELECT $materialization_id, 0, CAST(NULL AS VARCHAR)
    UNION
    SELECT e.upstream_materialization_id, c.depth + 1, e.materialization_id
    FROM chain c JOIN lineage_edges e ON e.materialization_id = c.materialization_id
    WHERE c.depth < 64
)
SELECT min(c.depth) AS depth, m.asset, m.partition, m.materialization_id, m.run_id,
       m.data_version, m.code_version, m.config_hash, m.device, m.started_at, m.ended_at, m."rows",
       list(DISTINCT c.via) FILTER (WHERE c.via IS NOT NULL) AS read_by
FROM chain c JOIN materializations m USING (materialization_id)
GROUP BY ALL
ORDER BY depth, m.asset, m.partition;
