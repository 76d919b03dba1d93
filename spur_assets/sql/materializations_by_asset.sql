-- Materialization counts and last run per asset and partition.
SELECT asset, partition, count(*) AS materializations, max(ended_at) AS last_ended_at,
       arg_max(materialization_id, ended_at) AS latest_materialization_id
FROM materializations
GROUP BY asset, partition
ORDER BY asset, partition;
