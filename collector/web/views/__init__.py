"""The console's pages and actions, one module per area: auth, alerts, events, admin."""
