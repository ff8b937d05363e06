-- pg_envelope 0.1.0 -> 0.2.0.
-- The full 0.2.0 script is built from pg_envelope--0.1.0.sql followed by this file
-- (see the Makefile), so a fresh install and an updated one run the same statements.
-- This script never changes once released.

\echo Use "ALTER EXTENSION pg_envelope UPDATE TO '0.2.0'" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Inventory of encrypted columns and key usage.

-- ---------------------------------------------------------------------------
-- Audit trail and guards.

-- ---------------------------------------------------------------------------
-- Fleet procedures: rotate_keys, reencrypt_all, rewrap_keys, rotation progress.

-- ---------------------------------------------------------------------------
-- Health check.

-- ---------------------------------------------------------------------------
-- Key-store triggers fire in logical-replication apply workers too.
--
-- A logical-replication apply worker runs with session_replication_role = replica, so
-- it fires only triggers enabled ALWAYS or REPLICA, and of those only row-level ones
-- (statement triggers fire for replicated TRUNCATEs and the initial table copy).  The
-- statement triggers fire ALWAYS; row triggers, enabled for replica sessions only so
-- that an ordinary session's key-store change still costs one trigger call per
-- statement, carry a replicated disable, retire, rotate or destroy to the subscriber's
-- sessions when the apply worker commits it.
ALTER TABLE envelope.tenant ENABLE ALWAYS TRIGGER key_store_changed;
ALTER TABLE envelope.tenant ENABLE ALWAYS TRIGGER key_store_changed_truncate;
ALTER TABLE envelope.data_key ENABLE ALWAYS TRIGGER key_store_changed;
ALTER TABLE envelope.data_key ENABLE ALWAYS TRIGGER key_store_changed_truncate;

CREATE TRIGGER key_store_changed_replicated
    AFTER INSERT OR UPDATE OR DELETE ON envelope.tenant
    FOR EACH ROW EXECUTE FUNCTION envelope.key_store_changed();
CREATE TRIGGER key_store_changed_replicated
    AFTER INSERT OR UPDATE OR DELETE ON envelope.data_key
    FOR EACH ROW EXECUTE FUNCTION envelope.key_store_changed();
ALTER TABLE envelope.tenant ENABLE REPLICA TRIGGER key_store_changed_replicated;
ALTER TABLE envelope.data_key ENABLE REPLICA TRIGGER key_store_changed_replicated;
