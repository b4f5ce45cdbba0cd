// Package faulttest holds the process-level fault tests of the relay (issue
// 4, items 1 to 6). It has no code outside its tests.
//
// TestMain builds cmd/caddy once; each test runs that binary as a
// subprocess, with the relay on a bbolt store in a temporary directory and
// its targets served by the test process on 127.0.0.1, and then kills it
// with SIGKILL, reloads it, stops it with SIGTERM, takes its targets down,
// fills its queue or its disk, while OkHi-like senders post events and
// retry the way OkHi does. Every test checks the contract's promise from
// the outside: an event that got a 200 reaches its targets at least once,
// whatever happened to the process, and an event that got only 503s is
// never delivered.
//
// The NATS tests (nats_test.go) build a nats-server binary once, without
// -race, and run it as a real process beside two Caddy instances of one
// relay on one stream: kill -9 of an instance under load (another one
// takes its deliveries over), and nats-server stopped, killed and
// restarted from its files while events flow.
//
// Run it with `go test -count=1 -v ./faulttest/` (about a minute on two
// cores, the build of Caddy included). It needs the go command and a
// unix; the storage tests need Linux, and root for their tmpfs (without
// it the disk-full cases skip, saying why). The
// figures of each run (events acked, kills, re-deliveries, reloads,
// latencies) are in the verbose log; FAULTTEST_SEED replays a run's
// random choices.
package faulttest
