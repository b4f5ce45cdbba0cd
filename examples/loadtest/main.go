// Command loadtest measures caddy-webhook-relay against Caddy's own
// `respond 200` and `reverse_proxy`, on 127.0.0.1 only, and prints a
// Markdown table (see issue 3, "Fast").
//
// It builds cmd/caddy, then starts each server variant in turn as a
// subprocess with fresh storage: respond 200 (the ceiling), reverse_proxy
// to the local target (a synchronous relay), the relay on bbolt, the relay
// on `storage memory`, and the relay on `storage nats` against a one-node
// nats-server (built from go.mod's version, JetStream with
// `sync_interval: always`, a fresh store dir and so a fresh stream for
// every run). -servers picks the variants. The target (the "internal
// service") runs in this process and counts what it receives by
// Idempotency-Key. When taskset exists the server (and relay-nats's
// nats-server with it) is pinned to CPU 0 and this process (load generator
// and target) to CPU 1.
//
// relay-nats runs the burst and latency scenarios; sustained runs on
// relay-bolt (and relay-bolt-jq), backlog (with the restart with events
// pending) on relay-bolt only.
//
// relay-bolt-jq (issue 9: what shaping for a legacy service costs) is
// relay-bolt with, on its forward block, `transform jq` (a few fields of
// the OkHi body into a new object), `body_format form` and `sign
// standard_webhooks`. It runs in the burst rounds beside the others and
// its own sustained search, the same as relay-bolt's; the summary gives
// both as ratios to relay-bolt's. The target checks one request of each of
// its runs: signature, form body, fields. It is left out of the default
// -servers, which it would lengthen by about a quarter:
//
//	go run ./examples/loadtest -scenarios burst,sustained -servers respond,reverse_proxy,relay-bolt,relay-bolt-jq
//
// The load generator writes pre-rendered HTTP/1.1 requests (OkHi v2
// bodies, a fraction of them exact re-sends) on pooled keep-alive
// connections and reads answers with http.ReadResponse: net/http's client
// would saturate its own core first. Every row records how busy the
// generator's process and each core were, so a generator-bound run shows.
//
//	go run ./examples/loadtest                       # about 5 minutes
//	go run ./examples/loadtest -duration 60s -restart-pending 1000000 -fill-timeout 10m
//	go run ./examples/loadtest -scenarios burst -pprof /tmp/prof   # with Caddy's profiles
//	go run ./examples/loadtest -scenarios latency -servers respond,relay-bolt -pprof /tmp/prof   # and traces
//	go run ./examples/loadtest -scenarios burst,latency -servers respond,relay-bolt,relay-nats
//	go run ./examples/loadtest -scenarios burst -servers respond,relay-bolt,relay-bolt-jq -duration 2s -rounds 1
//
// Sending the backlog and the restart-pending events is bounded by
// -fill-timeout; a row says when fewer were sent. Storage lives under -dir
// (default the system temp dir): on tmpfs fsync costs nothing, so the
// header names the file system.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"
)

type options struct {
	duration       time.Duration
	conns          int
	rate           float64
	resend         float64
	backlog        int
	restartPending int
	scenarios      []string
	servers        []string
	pin            bool
	caddyBin       string
	natsBin        string
	baseDir        string
	keep           bool
	concurrency    int
	drainTimeout   time.Duration
	fillTimeout    time.Duration
	sustainSteps   int
	pprofDir       string
	rounds         int
}

func main() {
	os.Exit(run())
}

func run() int {
	var o options
	var scen, servers string
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "length of each burst, latency and sustained run")
	flag.IntVar(&o.conns, "conns", 64, "keep-alive connections of the load generator")
	flag.Float64Var(&o.rate, "rate", 1000, "open-loop rate (requests/s) of the latency scenario")
	flag.Float64Var(&o.resend, "resend", 0.2, "fraction of requests that exactly re-send an earlier body")
	flag.IntVar(&o.backlog, "backlog", 100_000, "events sent while the target is down, then drained")
	flag.IntVar(&o.restartPending, "restart-pending", 200_000, "events pending when the relay is restarted (0 skips; the issue's figure is 1000000, with a longer -fill-timeout)")
	flag.StringVar(&scen, "scenarios", "burst,latency,sustained,backlog", "scenarios to run, comma-separated")
	flag.StringVar(&servers, "servers", strings.Join(defaultKinds, ","), "servers to run, comma-separated, some of "+strings.Join(allKinds, ", ")+
		"; sustained runs on relay-bolt (and relay-bolt-jq), backlog only on relay-bolt, relay-nats only burst and latency; "+
		"relay-bolt-jq (not in the default) is relay-bolt plus transform jq, body_format form and sign standard_webhooks on its forward block, "+
		"and runs burst and sustained, compared with relay-bolt")
	flag.BoolVar(&o.pin, "pin", true, "pin the server (and relay-nats's nats-server) to CPU 0 and this process to CPU 1 when taskset exists")
	flag.StringVar(&o.caddyBin, "caddy", "", "use this Caddy binary instead of building ./cmd/caddy")
	flag.StringVar(&o.natsBin, "nats-server", "", "use this nats-server binary instead of building go.mod's github.com/nats-io/nats-server/v2")
	flag.StringVar(&o.baseDir, "dir", "", "parent of the temp dir (holds the stores; its file system decides what fsync costs)")
	flag.BoolVar(&o.keep, "keep", false, "keep the temp dir (Caddyfiles, logs, stores)")
	flag.IntVar(&o.concurrency, "concurrency", 32, "the relay target's delivery concurrency")
	flag.DurationVar(&o.drainTimeout, "drain-timeout", 60*time.Second, "longest wait for the pending backlog to drain")
	flag.DurationVar(&o.fillTimeout, "fill-timeout", 30*time.Second, "longest time to send the backlog, and again the restart-pending events")
	flag.IntVar(&o.rounds, "rounds", 3, "burst rounds, each running every server once; the targets use the median of the rounds' ratios")
	flag.IntVar(&o.sustainSteps, "sustain-steps", 3, "rates tried by the sustained scenario (a search between the burst's delivery and ack rates)")
	flag.StringVar(&o.pprofDir, "pprof", "", "save Caddy's CPU and allocation profiles of each burst, and an execution trace of each relay latency run, into this directory")
	flag.Parse()
	var err error
	if o.scenarios, err = parseList(scen, []string{"burst", "latency", "sustained", "backlog"}); err != nil {
		fmt.Fprintf(os.Stderr, "-scenarios: %v\n", err)
		return 2
	}
	if o.servers, err = parseList(servers, allKinds); err != nil {
		fmt.Fprintf(os.Stderr, "-servers: %v\n", err)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	r := &runner{opts: o, burst: map[string]*burstFigures{}}
	code := r.main(ctx)
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "interrupted")
		return 130
	}
	return code
}

// parseList splits a comma-separated flag value, checking every item
// against known.
func parseList(v string, known []string) ([]string, error) {
	var out []string
	for s := range strings.SplitSeq(v, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		if !slices.Contains(known, s) {
			return nil, fmt.Errorf("unknown %q (want some of %s)", s, strings.Join(known, ", "))
		}
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("empty (want some of %s)", strings.Join(known, ", "))
	}
	return out, nil
}

// runs reports whether server kind is selected.
func (o *options) runs(kind string) bool { return slices.Contains(o.servers, kind) }

// natsNeeded: relay-nats is selected with a scenario it runs in.
func (o *options) natsNeeded() bool {
	return o.runs(kindNATS) && (slices.Contains(o.scenarios, "burst") || slices.Contains(o.scenarios, "latency"))
}

func (r *runner) main(ctx context.Context) int {
	o := r.opts
	fmt.Println("# webhook relay load test")
	fmt.Println()
	fmt.Println("command: go run ./examples/loadtest " + strings.Join(os.Args[1:], " "))
	for _, l := range machine() {
		fmt.Println(l)
	}

	tmp, err := os.MkdirTemp(o.baseDir, "webhook-relay-loadtest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if o.keep {
		fmt.Println("temp dir (kept): " + tmp)
	} else {
		defer os.RemoveAll(tmp)
	}
	r.base = tmp
	fmt.Printf("storage: %s (%s)\n", tmp, fsType(tmp))

	if o.pprofDir != "" {
		if err := os.MkdirAll(o.pprofDir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Println("profiles: " + o.pprofDir + " (go tool pprof -top <file>)")
	}

	r.bin = o.caddyBin
	if r.bin == "" {
		progress("building ./cmd/caddy")
		t0 := time.Now()
		if r.bin, err = buildCaddy(ctx, tmp); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		progress("built in %s", time.Since(t0).Round(time.Millisecond))
	}
	if o.natsNeeded() {
		r.natsBin = o.natsBin
		if r.natsBin == "" {
			progress("building nats-server (go.mod's version)")
			t0 := time.Now()
			if r.natsBin, err = buildNATS(ctx, tmp); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			progress("built in %s", time.Since(t0).Round(time.Millisecond))
		}
	}

	_, tsErr := exec.LookPath("taskset")
	if o.pin && len(readCores()) >= 2 && tsErr == nil {
		if err := pinSelf(1); err != nil {
			fmt.Fprintln(os.Stderr, "pinning: "+err.Error())
		} else {
			r.pinned = true
		}
	}
	if r.pinned {
		fmt.Println("pinning: server on CPU 0 (taskset -c 0), load generator and target on CPU 1 (taskset -a -pc 1)")
		if r.natsBin != "" {
			fmt.Println("pinning: relay-nats's nats-server on CPU 0 too (taskset -c 0), beside its Caddy")
		}
	} else {
		fmt.Printf("pinning: off (pin=%v, cores=%d, taskset: %v): figures are not comparable to pinned runs\n", o.pin, len(readCores()), tsErr == nil)
	}
	fmt.Printf("load: %d connections, %.0f%% exact re-sends, OkHi v2 bodies; relay forward concurrency %d, backoff 100ms 2s\n",
		o.conns, 100*o.resend, o.concurrency)
	fmt.Println("servers: " + strings.Join(o.servers, ", "))
	if o.runs(kindBoltJQ) {
		fmt.Printf("relay-bolt-jq: relay-bolt's settings plus, on its forward block, transform jq `%s`, body_format form, "+
			"sign standard_webhooks %s; the target verifies one request of each run; it runs burst and sustained only\n",
			shapingJQ, shapingSecret)
	}
	if r.natsBin != "" {
		fmt.Printf("relay-nats: %s, one node on 127.0.0.1, JetStream with sync_interval always (fsync before every ack), "+
			"a new nats-server on a fresh store dir (a fresh stream) for every run; its CPU counts in the server CPU column, "+
			"its RSS is in the notes; sustained and backlog (and the restart with events pending) do not run on it\n",
			strings.TrimSpace(cmdOutput(r.natsBin, "--version")))
	}
	fmt.Println()

	if r.target, err = startTarget(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer r.target.Close()
	defer r.stopServer() // whatever is still running, on any exit

	began := time.Now()
	for _, s := range o.scenarios {
		if ctx.Err() != nil {
			break
		}
		var err error
		switch s {
		case "burst":
			// Rounds interleave the servers, so that a noisy minute on a
			// shared machine falls on all of them.
			var rounds []map[string]*burstFigures
			for r.round = 1; r.round <= max(o.rounds, 1) && err == nil; r.round++ {
				r.burst = map[string]*burstFigures{}
				for _, k := range o.servers {
					if err = r.runBurst(ctx, k); err != nil {
						break
					}
				}
				rounds = append(rounds, r.burst)
			}
			r.round = 0
			r.mergeRounds(rounds)
		case "latency":
			err = r.latencies(ctx)
		case "sustained":
			// relay-bolt first, so that relay-bolt-jq's rows can say how
			// they compare.
			ran := false
			for _, k := range []string{kindBolt, kindBoltJQ} {
				if o.runs(k) && err == nil {
					ran = true
					err = r.runSustained(ctx, k)
					r.stopServer()
				}
			}
			if !ran {
				progress("sustained: skipped, it runs on relay-bolt and relay-bolt-jq, which -servers leaves out")
				continue
			}
		case "backlog":
			if !o.runs(kindBolt) {
				progress("backlog: skipped, it runs on relay-bolt, which -servers leaves out")
				continue
			}
			err = r.runBacklog(ctx)
		}
		r.stopServer()
		if err != nil {
			fmt.Fprintf(os.Stderr, "scenario %s: %v\n", s, err)
			r.failed = true
		}
	}
	progress("done in %s", time.Since(began).Round(time.Second))
	fmt.Println()
	r.printTable()
	r.printTargets()
	if r.failed {
		return 1
	}
	return 0
}

// latencies runs the latency scenario: respond as the floor, one write
// and fdatasync alone as the disk's floor (for relay-bolt), then each
// selected relay with the target healthy, slow and down. relay-memory
// acks without a write, so its latency says nothing about the store.
func (r *runner) latencies(ctx context.Context) error {
	if r.opts.runs(kindRespond) {
		if err := r.runLatency(ctx, kindRespond, modeHealthy); err != nil {
			return err
		}
	}
	if r.opts.runs(kindBolt) {
		if err := r.runSyncFloor(ctx); err != nil {
			return err
		}
	}
	for _, k := range []string{kindBolt, kindNATS} {
		if !r.opts.runs(k) {
			continue
		}
		for _, m := range []int32{modeHealthy, modeSlow, modeDown} {
			if err := r.runLatency(ctx, k, m); err != nil {
				return err
			}
		}
	}
	return nil
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}
