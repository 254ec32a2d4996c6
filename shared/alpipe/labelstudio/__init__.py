"""Label Studio as a client of alpipe: its ML-backend protocol (backend), the connection's records
(links), the calls alpipe makes into Label Studio (client) and the background jobs (sync)."""
