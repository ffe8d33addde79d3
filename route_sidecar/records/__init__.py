"""The rows of the side-car's database, one module per kind of record: the SQL and the
conversion between rows and the core's values. `route_sidecar.store.Tx` is made of these
classes, so a use case calls `tx.save_intent(...)` inside one `Store.atomic()`; no
`aiosqlite.Row` leaves this package."""
