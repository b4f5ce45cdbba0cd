// Command loadtest measures caddy-webhook-relay against Caddy's own
// `respond 200` and `reverse_proxy`, on 127.0.0.1 only, and prints a
// Markdown table (see issue 3, "Fast").
//
// It builds cmd/caddy, then starts each server variant in turn as a
// subprocess with fresh storage: respond 200 (the ceiling), reverse_proxy
// to the local target (a synchronous relay), the relay on bbolt, the relay
// on `storage memory`. The target (the "internal service") runs in this
// process and counts what it receives by Idempotency-Key. When taskset
// exists the server is pinned to CPU 0 and this process (load generator
// and target) to CPU 1.
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
	pin            bool
	caddyBin       string
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
	var scen string
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "length of each burst, latency and sustained run")
	flag.IntVar(&o.conns, "conns", 64, "keep-alive connections of the load generator")
	flag.Float64Var(&o.rate, "rate", 1000, "open-loop rate (requests/s) of the latency scenario")
	flag.Float64Var(&o.resend, "resend", 0.2, "fraction of requests that exactly re-send an earlier body")
	flag.IntVar(&o.backlog, "backlog", 100_000, "events sent while the target is down, then drained")
	flag.IntVar(&o.restartPending, "restart-pending", 200_000, "events pending when the relay is restarted (0 skips; the issue's figure is 1000000, with a longer -fill-timeout)")
	flag.StringVar(&scen, "scenarios", "burst,latency,sustained,backlog", "scenarios to run, comma-separated")
	flag.BoolVar(&o.pin, "pin", true, "pin the server to CPU 0 and this process to CPU 1 when taskset exists")
	flag.StringVar(&o.caddyBin, "caddy", "", "use this Caddy binary instead of building ./cmd/caddy")
	flag.StringVar(&o.baseDir, "dir", "", "parent of the temp dir (holds the stores; its file system decides what fsync costs)")
	flag.BoolVar(&o.keep, "keep", false, "keep the temp dir (Caddyfiles, logs, stores)")
	flag.IntVar(&o.concurrency, "concurrency", 32, "the relay target's delivery concurrency")
	flag.DurationVar(&o.drainTimeout, "drain-timeout", 60*time.Second, "longest wait for the pending backlog to drain")
	flag.DurationVar(&o.fillTimeout, "fill-timeout", 30*time.Second, "longest time to send the backlog, and again the restart-pending events")
	flag.IntVar(&o.rounds, "rounds", 3, "burst rounds, each running every server once; the targets use the median of the rounds' ratios")
	flag.IntVar(&o.sustainSteps, "sustain-steps", 3, "rates tried by the sustained scenario (a search between the burst's delivery and ack rates)")
	flag.StringVar(&o.pprofDir, "pprof", "", "save Caddy's CPU and allocation profiles of each burst into this directory")
	flag.Parse()
	for s := range strings.SplitSeq(scen, ",") {
		if s = strings.TrimSpace(s); s != "" {
			o.scenarios = append(o.scenarios, s)
		}
	}
	for _, s := range o.scenarios {
		if !slices.Contains([]string{"burst", "latency", "sustained", "backlog"}, s) {
			fmt.Fprintf(os.Stderr, "unknown scenario %q (want burst, latency, sustained, backlog)\n", s)
			return 2
		}
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
	} else {
		fmt.Printf("pinning: off (pin=%v, cores=%d, taskset: %v): figures are not comparable to pinned runs\n", o.pin, len(readCores()), tsErr == nil)
	}
	fmt.Printf("load: %d connections, %.0f%% exact re-sends, OkHi v2 bodies; relay forward concurrency %d, backoff 100ms 2s\n",
		o.conns, 100*o.resend, o.concurrency)
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
				for _, k := range []string{kindRespond, kindProxy, kindBolt, kindMemory} {
					if err = r.runBurst(ctx, k); err != nil {
						break
					}
				}
				rounds = append(rounds, r.burst)
			}
			r.round = 0
			r.mergeRounds(rounds)
		case "latency":
			if err = r.runLatency(ctx, kindRespond, modeHealthy); err != nil {
				break
			}
			for _, m := range []int32{modeHealthy, modeSlow, modeDown} {
				if err = r.runLatency(ctx, kindBolt, m); err != nil {
					break
				}
			}
		case "sustained":
			err = r.runSustained(ctx)
		case "backlog":
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

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}
