-- Serving indexes for FerretDB's PostgreSQL backend.
--
-- FerretDB pushes a top-level equality filter down as `_jsonb->'f' @> value`, and turns each
-- index a client declares into a btree index on `(_jsonb->'f')`. A btree cannot serve `@>`,
-- so without help every such query scans the table. This event trigger gives each of those
-- btree indexes a GIN twin on the same expressions (`jsonb_path_ops`), which `@>` can use, so
-- every index the service declares through the MongoDB API serves equality here without the
-- service knowing about PostgreSQL. It skips its own GIN indexes (no recursion) and
-- FerretDB's metadata tables.
--
-- FerretDB passes the field name as a query parameter (`_jsonb->$1`): the index matches only
-- in a custom plan, where the parameter is a constant, hence `plan_cache_mode =
-- force_custom_plan` in the cluster's configuration (scripts/services.sh).

CREATE OR REPLACE FUNCTION m365sync_gin_twin() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
  cmd record;
  idx record;
  cols text[];
  expr text;
  k int;
BEGIN
  FOR cmd IN SELECT objid FROM pg_event_trigger_ddl_commands()
             WHERE command_tag = 'CREATE INDEX' AND object_type = 'index'
  LOOP
    SELECT i.indexrelid, i.indnkeyatts, am.amname, n.nspname, c.relname AS index_name,
           t.relname AS table_name
      INTO idx
      FROM pg_index i
      JOIN pg_class c ON c.oid = i.indexrelid
      JOIN pg_am am ON am.oid = c.relam
      JOIN pg_class t ON t.oid = i.indrelid
      JOIN pg_namespace n ON n.oid = t.relnamespace
     WHERE i.indexrelid = cmd.objid;
    CONTINUE WHEN NOT FOUND OR idx.amname <> 'btree'
      OR idx.nspname IN ('pg_catalog', 'information_schema', 'public')
      OR idx.table_name LIKE '\_ferretdb\_%';
    cols := ARRAY[]::text[];
    FOR k IN 1..idx.indnkeyatts LOOP
      expr := pg_get_indexdef(idx.indexrelid, k, true);
      IF expr !~ '^\(*_jsonb -> ' THEN  -- not a FerretDB field expression
        cols := NULL;
        EXIT;
      END IF;
      cols := cols || ('(' || expr || ') jsonb_path_ops');
    END LOOP;
    CONTINUE WHEN cols IS NULL OR cardinality(cols) = 0;
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I.%I USING gin (%s)',
                   'gin_' || substr(md5(idx.nspname || '.' || idx.index_name), 1, 24),
                   idx.nspname, idx.table_name, array_to_string(cols, ', '));
  END LOOP;
END
$$;

DROP EVENT TRIGGER IF EXISTS m365sync_gin_twins;
CREATE EVENT TRIGGER m365sync_gin_twins ON ddl_command_end
  WHEN TAG IN ('CREATE INDEX') EXECUTE FUNCTION m365sync_gin_twin();
