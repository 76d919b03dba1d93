-- Which batches and which counterfactual sets went into a checkpoint (or any
-- materialization): the raw_pairs and synthetic_counterfactuals materializations
-- in its upstream chain, each once, nearest first. Parameter: $materialization_id.
WITH RECURSIVE chain(materialization_id, depth) AS (
    SELECT $materialization_id, 0
    UNION
    SELECT e.upstream_materialization_id, c.depth + 1
    FROM chain c JOIN lineage_edges e ON e.materialization_id = c.materialization_id
    WHERE c.depth < 64
)
SELECT m.asset, m.partition AS batch, m.materialization_id, m.data_version, m.run_id, m.ended_at,
       m."rows", min(c.depth) AS depth
FROM chain c JOIN materializations m USING (materialization_id)
WHERE m.asset IN ('raw_pairs', 'synthetic_counterfactuals')
GROUP BY ALL
ORDER BY m.asset, depth, m.partition;
