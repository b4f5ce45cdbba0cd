// Package natsstore is the relay's store on NATS JetStream, for several
// instances of one relay behind a load balancer. Every instance names the
// same servers and stream; the store creates what it needs on first use
// and checks it on every (re)connect, and never changes a stream whose
// settings differ (it stays down, saying which settings and why).
//
// What lives where, for a stream S:
//
//   - S (work queue): one message per (event, target) on S.d.<target>.<event id>,
//     or S.d.<target>.<key>.<event id> for a delivery with an order key
//     (the key's hash; the key itself in a header), the event's body with
//     its receipt time and content type in headers. Each target has a
//     durable pull consumer named after it, filtering both, shared by
//     every instance: one instance at a time holds a delivery, for the
//     queue's lease (AckWait); a lease that lapses goes to another. An
//     ordered queue hands out a keyed delivery only while it is the first
//     message of its key's subjects (order.go).
//   - S_DEAD (limits, one message per subject): dead letters on
//     S_DEAD.<target>.<event id>, the body and the delivery's attempt state
//     and order key.
//   - S_KEYS: dedupe keys (event id -> expiry), with per-key TTLs.
//   - S_ATTEMPTS: a delivery's attempts and next attempt, once it has
//     any, keyed <target>.<event id>. Attempts are the relay's, never the
//     consumer's redelivery count, which also counts every put-back.
//   - S_STATE: key states, with per-key TTLs.
//
// Target names that are not [A-Za-z0-9_-] are encoded into one subject
// token (see token). Intake answers only after JetStream acknowledged
// every delivery of the event; a retry is a delayed nak after the attempt
// record is written; a dead letter is written before its delivery is
// terminated, so an outcome is never lost, at worst repeated. Server 2.11
// or later (per-key TTLs) is required.
package natsstore
