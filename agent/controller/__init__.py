"""The fleet controller: a hawkBit-DDI-compatible update server for edgeops devices.

Modules, in the direction imports point (each imports only those below it):
    serve       puts the application on a socket with its limits: foreground or in a thread
    app         assembles the aiohttp application (build_app)
    ddi_routes  hawkBit DDI v1 for devices, served from this controller's fleet
    regional    the same DDI paths served from a mirror of a parent controller
    api_routes  /api/v1 for operators
    tasks       background work: long-poll wake-ups, last-seen batches, gate ticks, compaction
    http        what every route shares: Settings, app keys, middleware, typed request fields
    connections the connection cap: sheds anonymous floods, keeps headroom for devices
    metrics     Prometheus figures read from the database
    operator_token  the operator's token: its digest in the database, the token in a 0600 file
    fleet       fleet operations on the database: devices, bundles, actions, rollouts
    retention   what devices can make us keep: bounds, compaction of closed actions' feedback
    bundles     bundle intake: hash, verify as a device would, store by SHA-256
    actions     pure: what a DDI feedback report does to an action, and what is kept of it
    rollout     pure: wave planning and health gating (no clock, no I/O)
    db          SQLite (default, WAL) or PostgreSQL: schema versions, migrations, refusals
    tokens      tokens at rest: SHA-256 digests only
    errors      typed errors, each mapped to one HTTP status by http.errors_mw

Nothing on the device side imports this package (see docs/fleet-controller.md).
"""
