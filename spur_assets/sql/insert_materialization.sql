-- A replayed journal entry inserts nothing twice.
INSERT INTO materializations VALUES (
    $materialization_id, $asset, $partition, $run_id, $code_version, $config_hash,
    $data_version, $device, $started_at, $ended_at, $rows, $outputs
) ON CONFLICT DO NOTHING;
