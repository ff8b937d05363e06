/*
 * inventory.h — the inventory of encrypted columns, kept as security labels.
 */
#ifndef ENVELOPE_INVENTORY_H
#define ENVELOPE_INVENTORY_H

#include "postgres.h"

/* The label provider's name, as in SECURITY LABEL FOR pg_envelope ... */
#define INVENTORY_LABEL_PROVIDER "pg_envelope"

/* Register the security label provider; called from _PG_init. */
extern void inventory_register_label_provider(void);

#endif							/* ENVELOPE_INVENTORY_H */
