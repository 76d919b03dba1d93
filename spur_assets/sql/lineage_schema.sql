-- Lineage tables of SPUR_HOME/lineage.duckdb. Idempotent: run before every write.
-- One row per materialization; one row per input edge (which upstream
-- materialization, by data version, a materialization read).
CREATE TABLE IF NOT EXISTS materializations (
    materialization_id VARCHAR PRIMARY KEY,   -- uuid4 hex, also the artifact folder name
    asset              VARCHAR NOT NULL,
    partition          VARCHAR NOT NULL,      -- '' for unpartitioned assets
    run_id             VARCHAR NOT NULL,      -- Dagster run id
    code_version       VARCHAR NOT NULL,
    config_hash        VARCHAR NOT NULL,      -- sha256 of the canonical JSON of the run config
    data_version       VARCHAR NOT NULL,      -- sha256 over the outputs' (name, sha256)
    device             VARCHAR NOT NULL,
    started_at         TIMESTAMP NOT NULL,
    ended_at           TIMESTAMP NOT NULL,
    "rows"             BIGINT NOT NULL,       -- rows over all table outputs
    outputs            STRUCT(name VARCHAR, kind VARCHAR, uri VARCHAR, sha256 VARCHAR, "rows" BIGINT, bytes BIGINT)[] NOT NULL
);

CREATE TABLE IF NOT EXISTS lineage_edges (
    materialization_id            VARCHAR NOT NULL,  -- the reader
    upstream_materialization_id   VARCHAR NOT NULL,  -- what it read
    upstream_asset                VARCHAR NOT NULL,
    upstream_partition            VARCHAR NOT NULL,
    upstream_data_version         VARCHAR NOT NULL,
    PRIMARY KEY (materialization_id, upstream_materialization_id)
);
