-- One materialization by its id (zero rows if unknown). Parameter: $materialization_id.
SELECT * FROM materializations WHERE materialization_id = $materialization_id;
