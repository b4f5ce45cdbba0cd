package main

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"time"
)

// runner holds what the scenarios share.
type runner struct {
	opts    options
	bin     string
	natsBin string // nats-server, built when relay-nats runs
	base    string
	pinned  bool
	target  *target
	cur     *server // the running server, stopped on any exit
	failed  bool

	rows  []row
	burst map[string]*burstFigures
	// round is the burst round under way (0 outside the burst), and
	// burstRatios each relay's ratios to respond, one per round.
	round       int
	burstRatios map[string][]float64
	// toBolt is, by server, its acks over relay-bolt's, one per round
	// that ran both (relay-nats, relay-bolt-jq).
	toBolt map[string][]float64

	// Figures for the targets summary.
	latencyP99 map[string]map[int32]time.Duration // by server, by target mode
	// latencyRespondP99 is respond's p99 at the same rate: the floor.
	latencyRespondP99 time.Duration
	// latencySyncP99 is one write and fdatasync's p99 alone, at the same
	// rate: the disk's floor under relay-bolt's acks.
	latencySyncP99 time.Duration
	// sustained is, by server, the highest rate kept up with (0: tried,
	// none kept up with).
	sustained    map[string]float64
	drainRate    float64
	restartReady time.Duration
	restartN     int64
	maxOther     float64 // most CPU (% of a core) others used during a run
}

type burstFigures struct {
	acks, delivered, acceptedFraction float64
	p99                               time.Duration
	rss                               float64
	anonRSS                           float64 // the anonymous part, sampled (watchAnon)
	natsRSS                           float64 // relay-nats: nats-server's peak RSS
}

// row is one line of the report; negative numbers print as "–".
type row struct {
	scenario, server string
	acks, ratio      float64
	p50, p99         time.Duration
	genCPU, srvCPU   float64
	rss              float64
	notes            []string
}

func naRow(scenario, server string) row {
	return row{scenario: scenario, server: server, acks: -1, ratio: -1, p50: -1, p99: -1, genCPU: -1, srvCPU: -1, rss: -1}
}

func (r *runner) newServer(ctx context.Context, kind string) (*server, error) {
	r.stopServer()
	conf, err := newServerConf(r.base, kind, "http://"+r.target.addr+"/okhi", r.opts.concurrency)
	if err != nil {
		return nil, err
	}
	r.target.reset()
	r.target.mode.Store(modeHealthy)
	var ns *natsServer
	if kind == kindNATS {
		// A nats-server of its own on a fresh store dir: a fresh stream.
		ns, err = startNATS(ctx, r.natsBin, conf.dir, conf.storeDir(), conf.natsPort, conf.natsMonitor, r.pinned)
		if err != nil {
			return nil, err
		}
	}
	s, err := start(ctx, r.bin, conf, r.pinned)
	if err != nil {
		ns.stop()
		return nil, err
	}
	s.nats = ns
	r.cur = s
	if ns != nil {
		if err := s.waitStoreUp(ctx, 30*time.Second); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// stopServer stops the running server, if any, and returns how long the
// exit took.
func (r *runner) stopServer() time.Duration {
	if r.cur == nil {
		return 0
	}
	d := r.cur.stop()
	r.cur = nil
	return d
}

// measure runs spec against s and fills the common columns of a row.
func (r *runner) measure(ctx context.Context, s *server, scenario string, spec loadSpec) (*loadResult, row) {
	spec.addr = s.conf.addr()
	c0, n0 := s.cpu(), s.nats.cpu()
	res := runLoad(ctx, spec)
	c1, n1 := s.cpu(), s.nats.cpu()
	rw := row{
		scenario: scenario, server: s.conf.kind,
		acks: res.rate(), ratio: -1,
		p50: res.hist.quantile(0.50), p99: res.hist.quantile(0.99),
		genCPU: 100 * res.selfCPU.Seconds() / res.elapsed.Seconds(),
		srvCPU: 100 * (c1 - c0).Seconds() / res.elapsed.Seconds(),
		rss:    s.peakRSS(),
	}
	if s.nats != nil {
		rw.notes = append(rw.notes, fmt.Sprintf("server CPU is Caddy %.0f%% + nats-server %.0f%%",
			100*((c1-c0)-(n1-n0)).Seconds()/res.elapsed.Seconds(), 100*(n1-n0).Seconds()/res.elapsed.Seconds()))
	}
	if resp := r.respondAcks(); resp > 0 && spec.rate == 0 {
		rw.ratio = rw.acks / resp // only a closed loop measures a maximum
	}
	if bad := res.non200(); bad != "" {
		rw.notes = append(rw.notes, "non-200: "+bad)
	}
	if res.connErrors > 0 {
		rw.notes = append(rw.notes, fmt.Sprintf("%d connection errors (first: %s)", res.connErrors, res.firstErr))
	}
	if res.late > 0 {
		rw.notes = append(rw.notes, fmt.Sprintf("%d sends >1ms behind schedule", res.late))
	}
	if res.unsent > 0 {
		rw.notes = append(rw.notes, fmt.Sprintf("%d scheduled sends never made (server slower than the rate)", res.unsent))
	}
	if s.exited() {
		rw.notes = append(rw.notes, fmt.Sprintf("SERVER EXITED: %v", s.err))
	}
	if rw.genCPU >= 85 {
		rw.notes = append(rw.notes, "GENERATOR-BOUND: the generator's process used most of its core")
	}
	rw.notes = append(rw.notes, r.coresNote(res.cores, rw.genCPU+rw.srvCPU))
	progress("  %s %s: %s acks/s, p50 %s, p99 %s, gen %.0f%%, server %.0f%% CPU, %s",
		scenario, s.conf.kind, fmtRate(rw.acks), fmtDur(rw.p50), fmtDur(rw.p99), rw.genCPU, rw.srvCPU, strings.Join(rw.notes, "; "))
	return res, rw
}

func (r *runner) respondAcks() float64 {
	if b := r.burst[kindRespond]; b != nil {
		return b.acks
	}
	return 0
}

// coresNote says how busy the first two cores were and how much of that
// was neither ours nor the server's (other processes, interrupts): a
// shared or noisy machine shows here.
func (r *runner) coresNote(c []coreLoad, ours float64) string {
	if len(c) == 0 {
		return ""
	}
	parts := make([]string, 0, 2)
	var all, steal, irq float64
	for i, v := range c {
		all += v.busy
		steal += v.steal
		irq += v.irq
		if i < 2 {
			name := fmt.Sprintf("cpu%d", i)
			if r.pinned {
				name = [2]string{"server core", "generator core"}[i]
			}
			parts = append(parts, fmt.Sprintf("%s %.0f%%", name, v.busy))
		}
	}
	s := "busy " + strings.Join(parts, ", ")
	if other := all - irq - ours; other >= 10 {
		s += fmt.Sprintf(" (other processes %.0f%% of a core)", other)
		r.maxOther = max(r.maxOther, other)
	}
	if irq >= 5 {
		s += fmt.Sprintf(", irq %.0f%%", irq)
	}
	if steal >= 2 {
		s += fmt.Sprintf(", %.0f%% stolen by the hypervisor", steal)
	}
	return s
}

// benign are log messages Caddy or the relay write on every start or stop.
var benign = []string{
	"HTTP/2 skipped because it requires TLS",
	"HTTP/3 skipped because it requires TLS",
	"exiting; byeee!! 👋",
	"storage is memory: events are lost when Caddy stops",
}

// finish stops s and adds what its log (and its nats-server's) said at
// warn level or worse.
func (r *runner) finish(s *server, rw *row) time.Duration {
	d := r.stopServer()
	p := s.logProblems()
	if s.nats != nil {
		for k, n := range s.nats.logProblems() {
			p["nats-server "+k] += n
		}
	}
	keys := make([]string, 0, len(p))
	for k := range p {
		if !slices.ContainsFunc(benign, func(b string) bool { return strings.HasSuffix(k, ": "+b) }) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	if len(keys) > 0 {
		var b []string
		for _, k := range keys {
			b = append(b, fmt.Sprintf("%q×%d", k, p[k]))
		}
		rw.notes = append(rw.notes, "log: "+strings.Join(b, ", "))
	}
	if s.err != nil && !strings.Contains(s.err.Error(), "signal: terminated") && s.err.Error() != "exit status 0" {
		rw.notes = append(rw.notes, fmt.Sprintf("exit: %v", s.err))
	}
	return d
}

func isRelay(kind string) bool {
	return kind == kindBolt || kind == kindMemory || kind == kindNATS || kind == kindBoltJQ
}

// comparedToBolt are the servers whose burst is also reported as a ratio
// to relay-bolt's in the same round.
var comparedToBolt = []string{kindNATS, kindBoltJQ}

// runBurst: closed loop, all connections, -duration, target healthy.
func (r *runner) runBurst(ctx context.Context, kind string) error {
	progress("burst: %s, closed loop, %d connections, %s", kind, r.opts.conns, r.opts.duration)
	s, err := r.newServer(ctx, kind)
	if err != nil {
		return err
	}
	var profiled chan struct{}
	if r.opts.pprofDir != "" {
		profiled = s.profile(r.opts.pprofDir, "burst-"+kind, r.opts.duration-time.Second/2)
	}
	u0 := r.target.unique.Load()
	scenario := "burst"
	if r.opts.rounds > 1 {
		scenario = fmt.Sprintf("burst, round %d", r.round)
	}
	res, rw := r.measure(ctx, s, scenario, loadSpec{conns: r.opts.conns, duration: r.opts.duration, resend: r.opts.resend})
	if profiled != nil {
		<-profiled
	}
	delivered := float64(r.target.unique.Load()-u0) / res.elapsed.Seconds()
	fig := &burstFigures{acks: rw.acks, p99: rw.p99, rss: rw.rss, delivered: delivered}
	if res.ok() > 0 {
		fig.acceptedFraction = float64(res.accepted) / float64(res.ok())
	}
	if kind == kindRespond {
		rw.ratio = 1
	}
	if kind == kindProxy {
		rw.notes = append(rw.notes, fmt.Sprintf("target got %d requests", r.target.requests.Load()))
	}
	if isRelay(kind) {
		rw.notes = append(rw.notes, fmt.Sprintf("%d accepted, %d duplicate; delivered %s/s during the burst",
			res.accepted, res.duplicate, fmtRate(delivered)))
		t0 := time.Now()
		last, _ := r.target.waitUnique(ctx, res.accepted, r.opts.drainTimeout)
		if last.IsZero() {
			rw.notes = append(rw.notes, fmt.Sprintf("NOT DRAINED: %d of %d accepted still undelivered %s after the burst",
				res.accepted-r.target.unique.Load(), res.accepted, r.opts.drainTimeout))
		} else {
			rw.notes = append(rw.notes, fmt.Sprintf("rest drained %.1fs after", last.Sub(t0).Seconds()))
		}
		if n := r.target.redelivered.Load(); n > 0 {
			rw.notes = append(rw.notes, fmt.Sprintf("%d redelivered", n))
		}
		if kind == kindBolt || kind == kindNATS || kind == kindBoltJQ {
			rw.notes = append(rw.notes, fmt.Sprintf("store %.1f MB", float64(dirSize(s.conf.storeDir()))/(1<<20)))
		}
		if b := r.burst[kindBolt]; b != nil && b.acks > 0 && slices.Contains(comparedToBolt, kind) {
			rw.notes = append(rw.notes, fmt.Sprintf("%.2fx relay-bolt this round", rw.acks/b.acks))
		}
		if kind == kindBoltJQ {
			rw.notes = append(rw.notes, r.target.shapingNote())
		}
		rw.rss = s.peakRSS()
		fig.rss, fig.anonRSS = rw.rss, s.peakAnon()
		rw.notes = append(rw.notes, fmt.Sprintf("peak anonymous RSS %.0f MB (sampled every %v; the rest of the peak is mapped files)", fig.anonRSS, anonEvery))
		if s.nats != nil {
			fig.natsRSS = s.nats.peakRSS()
			rw.notes = append(rw.notes, fmt.Sprintf("peak RSS is Caddy's; nats-server's %.0f MB", fig.natsRSS))
		}
	}
	r.burst[kind] = fig
	r.finish(s, &rw)
	r.rows = append(r.rows, rw)
	return ctx.Err()
}

// mergeRounds keeps each round's ratios to that round's respond, and
// leaves in r.burst the median figures of each server over the rounds (the
// largest peak RSS).
func (r *runner) mergeRounds(rounds []map[string]*burstFigures) {
	r.burstRatios = map[string][]float64{}
	r.toBolt = map[string][]float64{}
	for _, round := range rounds {
		b := round[kindBolt]
		if b == nil || b.acks <= 0 {
			continue
		}
		for _, k := range comparedToBolt {
			if f := round[k]; f != nil {
				r.toBolt[k] = append(r.toBolt[k], f.acks/b.acks)
			}
		}
	}
	merged := map[string]*burstFigures{}
	for _, k := range allKinds {
		var acks, delivered, accepted []float64
		var p99s []time.Duration
		m := &burstFigures{}
		for _, round := range rounds {
			f := round[k]
			if f == nil {
				continue
			}
			acks = append(acks, f.acks)
			delivered = append(delivered, f.delivered)
			accepted = append(accepted, f.acceptedFraction)
			p99s = append(p99s, f.p99)
			m.rss = max(m.rss, f.rss)
			m.anonRSS = max(m.anonRSS, f.anonRSS)
			m.natsRSS = max(m.natsRSS, f.natsRSS)
			if resp := round[kindRespond]; resp != nil && resp.acks > 0 {
				r.burstRatios[k] = append(r.burstRatios[k], f.acks/resp.acks)
			}
		}
		if len(acks) == 0 {
			continue
		}
		m.acks, m.delivered, m.acceptedFraction = median(acks), median(delivered), median(accepted)
		slices.Sort(p99s)
		m.p99 = p99s[len(p99s)/2]
		merged[k] = m
	}
	r.burst = merged
}

// median of xs (the upper one of an even count).
func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

var modeNames = map[int32]string{modeHealthy: "target healthy", modeSlow: "target slow 2s", modeDown: "target down 503"}

// runLatency: open loop at -rate on a fresh server of kind, the target in
// mode. Caddy's respond at the same rate is the machine's floor.
func (r *runner) runLatency(ctx context.Context, kind string, mode int32) error {
	progress("latency: %s, open loop %.0f/s, %s, %s", kind, r.opts.rate, modeNames[mode], r.opts.duration)
	s, err := r.newServer(ctx, kind)
	if err != nil {
		return err
	}
	r.target.mode.Store(mode)
	var traced chan struct{}
	if r.opts.pprofDir != "" && kind != kindRespond {
		traced = s.trace(r.opts.pprofDir, fmt.Sprintf("latency-%s-%s", kind, strings.Fields(modeNames[mode])[1]), r.opts.duration-time.Second/2)
	}
	scenario := fmt.Sprintf("latency %.0f/s, %s", r.opts.rate, modeNames[mode])
	res, rw := r.measure(ctx, s, scenario, loadSpec{conns: r.opts.conns, duration: r.opts.duration, rate: r.opts.rate, resend: r.opts.resend})
	if traced != nil {
		<-traced
	}
	if kind == kindRespond {
		r.latencyRespondP99 = rw.p99
		rw.notes = append(rw.notes, fmt.Sprintf("max %s", fmtDur(res.hist.max)))
		r.finish(s, &rw)
		r.rows = append(r.rows, rw)
		return ctx.Err()
	}
	if r.latencyP99 == nil {
		r.latencyP99 = map[string]map[int32]time.Duration{}
	}
	if r.latencyP99[kind] == nil {
		r.latencyP99[kind] = map[int32]time.Duration{}
	}
	r.latencyP99[kind][mode] = rw.p99
	rw.notes = append(rw.notes, fmt.Sprintf("max %s", fmtDur(res.hist.max)))
	if p99, err := s.ackP99(); err == nil {
		rw.notes = append(rw.notes, fmt.Sprintf("inside Caddy p99 <= %s (ack_duration_seconds bucket)", fmtDur(p99)))
	}
	rw.notes = append(rw.notes, fmt.Sprintf("target: %d delivered, %d refused", r.target.unique.Load(), r.target.refused.Load()))
	if p, err := s.pending(); err == nil {
		rw.notes = append(rw.notes, fmt.Sprintf("%d pending at the end", p))
	}
	rw.rss = s.peakRSS()
	if s.nats != nil {
		rw.notes = append(rw.notes, fmt.Sprintf("peak RSS is Caddy's; nats-server's %.0f MB", s.nats.peakRSS()))
	}
	if d := r.finish(s, &rw); d > time.Second {
		rw.notes = append(rw.notes, fmt.Sprintf("shutdown took %.1fs", d.Seconds()))
	}
	r.target.mode.Store(modeHealthy)
	r.rows = append(r.rows, rw)
	return ctx.Err()
}

// runSustained: open loop on kind (relay-bolt, relay-bolt-jq), searching
// for the highest rate at which both ack and delivery keep up: at least
// 95% of the rate acked, and the backlog drained within 3 s of the end of
// the run. Each step runs on a fresh relay, starting from the burst's
// min(ack rate, delivery rate) of that kind.
func (r *runner) runSustained(ctx context.Context, kind string) error {
	// The burst bounds the search: acks at most its ack rate (hi), and
	// delivery at least what it delivered while also acking (lo).
	var lo, hi float64
	if b := r.burst[kind]; b != nil && b.acceptedFraction > 0 {
		lo, hi = min(b.acks, b.delivered/b.acceptedFraction), b.acks
	} else {
		// No burst figures: calibrate with a short closed loop.
		s, err := r.newServer(ctx, kind)
		if err != nil {
			return err
		}
		progress("sustained: %s, calibrating with a %s closed loop", kind, r.opts.duration/2)
		res := runLoad(ctx, loadSpec{addr: s.conf.addr(), conns: r.opts.conns, duration: r.opts.duration / 2, resend: r.opts.resend})
		if res.ok() > 0 && res.accepted > 0 {
			del := float64(r.target.unique.Load()) / res.elapsed.Seconds()
			lo, hi = min(res.rate(), del*float64(res.ok())/float64(res.accepted)), res.rate()
		}
	}
	if lo <= 0 {
		return fmt.Errorf("no estimate of %s's throughput", kind)
	}
	if r.sustained == nil {
		r.sustained = map[string]float64{}
	}
	r.sustained[kind] = 0 // tried: 0 until a rate is kept up with
	// Start between the bounds; then bisect between the highest rate kept
	// up with (pass) and the lowest not (fail).
	rate, pass, fail := 0.95*math.Sqrt(lo*hi), 0.0, 0.0
	for step := 0; step < r.opts.sustainSteps && ctx.Err() == nil; step++ {
		s, err := r.newServer(ctx, kind)
		if err != nil {
			return err
		}
		progress("sustained: %s, open loop %.0f/s, %s", kind, rate, r.opts.duration)
		res, rw := r.measure(ctx, s, fmt.Sprintf("sustained %.0f/s", rate),
			loadSpec{conns: r.opts.conns, duration: r.opts.duration, rate: rate, resend: r.opts.resend})
		t0 := time.Now()
		last, _ := r.target.waitUnique(ctx, res.accepted, 3*time.Second)
		drained := !last.IsZero()
		acked := rw.acks >= 0.95*rate
		switch {
		case drained && acked:
			rw.notes = append(rw.notes, fmt.Sprintf("kept up: backlog drained %.1fs after the run", last.Sub(t0).Seconds()))
		case !drained:
			rw.notes = append(rw.notes, fmt.Sprintf("FELL BEHIND: %d of %d undelivered 3s after the run", res.accepted-r.target.unique.Load(), res.accepted))
		default:
			rw.notes = append(rw.notes, fmt.Sprintf("FELL BEHIND: acked only %.0f%% of the rate", 100*rw.acks/rate))
		}
		if p := r.burst[kindProxy]; p != nil && p.acks > 0 {
			rw.notes = append(rw.notes, fmt.Sprintf("%.2fx reverse_proxy max", rw.acks/p.acks))
		}
		if b := r.sustained[kindBolt]; kind != kindBolt && b > 0 {
			rw.notes = append(rw.notes, fmt.Sprintf("%.2fx relay-bolt's sustained", rw.acks/b))
		}
		rw.notes = append(rw.notes, fmt.Sprintf("%s new events/s", fmtRate(float64(res.accepted)/res.elapsed.Seconds())))
		if kind == kindBoltJQ {
			rw.notes = append(rw.notes, r.target.shapingNote())
		}
		rw.rss = s.peakRSS()
		r.finish(s, &rw)
		r.rows = append(r.rows, rw)
		if drained && acked {
			pass = rate
			r.sustained[kind] = max(r.sustained[kind], rw.acks)
		} else {
			fail = rate
		}
		switch {
		case fail == 0 && hi > pass*1.05:
			rate = (pass + hi) / 2
		case fail == 0:
			rate = pass * 1.25 // the burst's ack rate was no ceiling after all
		case pass == 0 && lo < fail*0.9:
			rate = lo * 0.95
		case pass == 0:
			rate = fail * 0.7
		default:
			rate = (pass + fail) / 2
		}
	}
	return ctx.Err()
}

// runBacklog: fill relay-bolt with -backlog events while the target is
// down, bring it up and time the drain; then, with -restart-pending,
// restart the relay with that many events pending.
func (r *runner) runBacklog(ctx context.Context) error {
	s, err := r.newServer(ctx, kindBolt)
	if err != nil {
		return err
	}
	var acceptedTotal int64
	fill := func(n int, scenario string) (*loadResult, row) {
		r.target.mode.Store(modeDown)
		progress("%s: relay-bolt, %d events at full speed, target down", scenario, n)
		res, rw := r.measure(ctx, s, scenario, loadSpec{conns: r.opts.conns, count: int64(n), maxTime: r.opts.fillTimeout})
		acceptedTotal += res.accepted
		rw.notes = append(rw.notes, fmt.Sprintf("%d accepted in %.1fs; target refused %d attempts", res.accepted, res.elapsed.Seconds(), r.target.refused.Load()))
		if int64(n) != res.responses {
			rw.notes = append(rw.notes, fmt.Sprintf("only %d of %d sent within %s", res.responses, n, r.opts.fillTimeout))
		}
		return res, rw
	}
	drain := func(scenario string) row {
		progress("%s: target up, waiting for %d events", scenario, acceptedTotal-r.target.unique.Load())
		rw := naRow(scenario, s.conf.kind)
		want := acceptedTotal - r.target.unique.Load()
		c0, g0, cores0 := s.cpu(), selfCPU(), readCores()
		t0 := time.Now()
		r.target.mode.Store(modeHealthy)
		last, first := r.target.waitUnique(ctx, acceptedTotal, r.opts.drainTimeout)
		end := last
		if end.IsZero() {
			end = time.Now()
		}
		el := end.Sub(t0).Seconds()
		rw.srvCPU = 100 * (s.cpu() - c0).Seconds() / el
		rw.genCPU = 100 * (selfCPU() - g0).Seconds() / el
		rw.rss = s.peakRSS()
		if last.IsZero() {
			rw.notes = append(rw.notes, fmt.Sprintf("NOT DRAINED: %d of %d undelivered after %s", acceptedTotal-r.target.unique.Load(), want, r.opts.drainTimeout))
		} else {
			rate := float64(want) / el
			rw.notes = append(rw.notes, fmt.Sprintf("**delivered %s/s**: %d events in %.1fs", fmtRate(rate), want, el))
			if !first.IsZero() && last.Sub(first) > 0 {
				rw.notes = append(rw.notes, fmt.Sprintf("first delivery after %.2fs, %s/s from first to last", first.Sub(t0).Seconds(), fmtRate(float64(want)/last.Sub(first).Seconds())))
			}
			r.drainRate = max(r.drainRate, rate)
		}
		if n := r.target.redelivered.Load(); n > 0 {
			rw.notes = append(rw.notes, fmt.Sprintf("%d redelivered", n))
		}
		rw.notes = append(rw.notes, r.coresNote(coreBusy(cores0, readCores()), rw.genCPU+rw.srvCPU))
		rw.notes = append(rw.notes, fmt.Sprintf("store %.1f MB", float64(dirSize(s.conf.storeDir()))/(1<<20)))
		progress("  %s", strings.Join(rw.notes, "; "))
		return rw
	}

	if r.opts.backlog > 0 {
		_, rw := fill(r.opts.backlog, "backlog fill")
		r.rows = append(r.rows, rw)
		r.rows = append(r.rows, drain("backlog drain"))
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	if r.opts.restartPending <= 0 {
		r.finish(s, &r.rows[len(r.rows)-1])
		return ctx.Err()
	}

	_, rw := fill(r.opts.restartPending, "restart fill")
	r.rows = append(r.rows, rw)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	pendingBefore, _ := s.pending()
	rw = naRow(fmt.Sprintf("restart, %d pending", pendingBefore), s.conf.kind)
	stopRow := row{}
	shutdown := r.finish(s, &stopRow)
	progress("restart: stopped with %d pending in %.2fs; starting again", pendingBefore, shutdown.Seconds())
	s2, err := launch(r.bin, s.conf, r.pinned)
	if err != nil {
		return err
	}
	r.cur = s2
	var firstAnswer, ready time.Duration
	statuses := map[int]int{}
	deadline := time.Now().Add(60 * time.Second)
	for ctx.Err() == nil && time.Now().Before(deadline) && !s2.exited() {
		code, err := probe(s2.conf.addr(), 5*time.Second)
		if err == nil {
			if firstAnswer == 0 {
				firstAnswer = time.Since(s2.started)
			}
			statuses[code]++
			if code == 200 {
				ready = time.Since(s2.started)
				acceptedTotal++ // the probe is a new event
				break
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	if ready == 0 {
		rw.notes = append(rw.notes, fmt.Sprintf("NOT SERVING 200 within 60s (answers: %v, exited: %v)", statuses, s2.exited()))
	} else {
		rw.notes = append(rw.notes, fmt.Sprintf("**serving 200 %.2fs after exec**", ready.Seconds()))
		r.restartReady, r.restartN = ready, pendingBefore
	}
	if firstAnswer > 0 && firstAnswer != ready {
		rw.notes = append(rw.notes, fmt.Sprintf("first answer after %.2fs", firstAnswer.Seconds()))
	}
	delete(statuses, 200)
	if len(statuses) > 0 {
		rw.notes = append(rw.notes, fmt.Sprintf("answers before the 200: %v", statuses))
	}
	rw.notes = append(rw.notes, fmt.Sprintf("shutdown with %d pending took %.2fs", pendingBefore, shutdown.Seconds()))
	rw.notes = append(rw.notes, stopRow.notes...)
	if p, err := s2.pending(); err == nil {
		rw.notes = append(rw.notes, fmt.Sprintf("%d pending after restart", p))
	}
	rw.rss = s2.peakRSS()
	s = s2
	r.rows = append(r.rows, rw)
	r.rows = append(r.rows, drain("restart drain"))
	r.finish(s, &r.rows[len(r.rows)-1])
	return ctx.Err()
}
