// Package relay is the engine of caddy-webhook-relay, usable without Caddy.
//
// The pipeline of one webhook: Authenticator.Check (constant time) ->
// Engine.Receive: derive the event id from the dedupe key (Config.EventID),
// drop it if the key was seen within its TTL (LRU, then the store), store it
// durably with one pending delivery per matching target, and only then
// return, so that the caller may ack. In the background, each target's
// workers deliver due events over HTTP and settle every attempt in the
// store: delivered (2xx), retried with backoff (408, 425, 429, 5xx,
// timeouts, connection errors), or dead-lettered (other 4xx, max attempts,
// max age).
//
// Guarantee: an event Receive accepted is delivered at least once to every
// target it matched, or kept as a dead letter that can be replayed; across
// crashes and restarts too, with the bbolt store.
package relay
