"""The central communications station: device keys, authorization, presence
and rendezvous over TLS. See docs/ccs.md."""
