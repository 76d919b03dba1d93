-- The Parquet files behind each table view: for every (asset, partition), the
-- table outputs of its most recent materialization.
WITH latest AS (
    SELECT *
    FROM materializations
    QUALIFY row_number() OVER (PARTITION BY asset, partition ORDER BY ended_at DESC, materialization_id DESC) = 1
)
SELECT o.name AS table_name, list(o.uri ORDER BY latest.partition) AS uris
FROM latest, unnest(latest.outputs) AS t(o)
WHERE o.kind = 'table'
GROUP BY o.name
ORDER BY o.name;
