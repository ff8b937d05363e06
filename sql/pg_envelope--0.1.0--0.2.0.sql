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
