-- The most recent materialization of an asset (and partition, '' when unpartitioned).
SELECT *
FROM materializations
WHERE asset = $asset AND ($partition IS NULL OR partition = $partition)
ORDER BY ended_at DESC, materialization_id DESC
LIMIT 1;
