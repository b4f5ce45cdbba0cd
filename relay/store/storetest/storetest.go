// Package storetest is the contract every store.Store backend keeps,
// written once and run against each backend from its own tests:
//
//	storetest.Run(t, storetest.Harness{Open: ...})
//
// The suite owns the store's clock. A store of one process runs on a fake
// clock that the suite moves (waking the store's waiting Takes through
// Harness.Wake); a backend whose server keeps its own time (JetStream's
// redelivery delays and TTLs) sets RealClock, and the suite then waits
// short real delays out, polling for what they should bring.
package storetest

import (
	"testing"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// Harness opens stores of one backend for the suite.
type Harness struct {
	// Open returns a new, empty store whose clock is now (never nil). The
	// suite closes it.
	Open func(t testing.TB, now func() time.Time) store.Store
	// Reopen, if set, closes s and opens the same durable state again
	// (same clock); the suite then checks what survived.
	Reopen func(t testing.TB, s store.Store, now func() time.Time) store.Store
	// Shared: several instances share the backend (NATS): Retire keeps
	// deliveries pending instead of dead-lettering them, and Counts may
	// lag a write by the store's refresh interval.
	Shared bool
	// Wake, if set, makes the store's waiting Takes look at the clock
	// again (stores whose timers run on real time while the suite's clock
	// is fake).
	Wake func(s store.Store)
	// RealClock: the backend's own timing (redelivery delays, TTLs) runs
	// on the wall clock; the suite then passes time.Now and uses short
	// real delays (tens of ms) instead of moving a fake clock.
	RealClock bool
}

// contractTest is one test of the contract, run on stores it opens
// itself through newEnv.
type contractTest struct {
	name string
	run  func(t *testing.T, h Harness)
}

// core is what a minimal backend must pass first: intake with dedupe,
// taking and settling, postponing, ordered queues, and the counts after
// each step.
var core = []contractTest{
	{"AcceptDuplicate", testAcceptDuplicate},
	{"TakeSettle", testTakeSettle},
	{"Postpone", testPostpone},
	{"OrderedOneAtATime", testOrderedOneAtATime},
	{"OrderedWaits", testOrderedWaits},
	{"OrderedOtherKeys", testOrderedOtherKeys},
	{"OrderedOff", testOrderedOff},
	{"OrderedToggle", testOrderedToggle},
	{"OrderedToggleWhileLeased", testOrderedToggleWhileLeased},
	{"ListPendingPaging", testListPendingPaging},
	{"InspectAttempts", testInspectAttempts},
}

// rest is the remainder of the contract.
var rest = []contractTest{
	{"AcceptKeyExpiry", testAcceptKeyExpiry},
	{"AcceptNoKey", testAcceptNoKey},
	{"AcceptWithoutTargets", testAcceptWithoutTargets},
	{"AcceptConcurrentOneID", testAcceptConcurrentOneID},
	{"AcceptConcurrent", testAcceptConcurrent},
	{"AcceptMaxPending", testAcceptMaxPending},
	{"TakeOrder", testTakeOrder},
	{"TakeConcurrentTakers", testTakeConcurrentTakers},
	{"TakeWaitsForContext", testTakeWaitsForContext},
	{"TakeWokenByAccept", testTakeWokenByAccept},
	{"TakeFreshPastRetries", testTakeFreshPastRetries},
	{"SettleTwice", testSettleTwice},
	{"SettleThen", testSettleThen},
	{"DeadLettersPaging", testDeadLettersPaging},
	{"Replay", testReplay},
	{"DeleteDead", testDeleteDead},
	{"Retire", testRetire},
	{"KeyStates", testKeyStates},
	{"ExpireKeys", testExpireKeys},
	{"Closed", testClosed},
	{"Reopen", testReopen},
	{"OrderedReopen", testOrderedReopen},
	{"OrderedReplay", testOrderedReplay},
	{"OrderedRetire", testOrderedRetire},
	{"OrderedDeleteDead", testOrderedDeleteDead},
	{"InspectReopen", testInspectReopen},
}

// RunCore runs the core of the contract: intake with dedupe (Accept, dup,
// Seen), Take and Settle (Delivered, Retry at a time, Dead), Postpone,
// ordered queues (QueueOptions.Ordered, AcceptOptions.OrderKeys), and
// Counts after each.
func RunCore(t *testing.T, h Harness) {
	t.Helper()
	run(t, h, core)
}

// Run runs the whole contract: the core, then the rest.
func Run(t *testing.T, h Harness) {
	t.Helper()
	run(t, h, core)
	run(t, h, rest)
}

func run(t *testing.T, h Harness, tests []contractTest) {
	t.Helper()
	if h.Open == nil {
		t.Fatal("storetest: Harness.Open is nil")
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.run(t, h) })
	}
}
