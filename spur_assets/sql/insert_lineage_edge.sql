INSERT INTO lineage_edges VALUES (
    $materialization_id, $upstream_materialization_id, $upstream_asset,
    $upstream_partition, $upstream_data_version
) ON CONFLICT DO NOTHING;
