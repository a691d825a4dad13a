"""The contract between services: every event and RPC payload, versioned. Consumers ignore unknown fields."""
