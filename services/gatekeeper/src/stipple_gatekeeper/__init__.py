"""Stipple gatekeeper: where a node meets the network. It admits the connections that
prove an Ethereum key (NATS auth callout), as a node when the chain says the key holds
the minimum stake and is not banned, else as an applicant that can only ask why; it
creates the admitted node's work consumers; it closes the connections of nodes that
lose their right; and it takes the nodes' uploads into the blob store (nodes hold no
blob-store credentials)."""
