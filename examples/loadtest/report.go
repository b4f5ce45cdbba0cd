package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

func (r *runner) printTable() {
	fmt.Println("| scenario | server | acks/s | ratio to respond | p50 | p99 | generator CPU % | server CPU % | peak RSS MB | notes |")
	fmt.Println("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
	for _, rw := range r.rows {
		notes := make([]string, 0, len(rw.notes))
		for _, n := range rw.notes {
			if n != "" {
				notes = append(notes, strings.ReplaceAll(n, "|", `\|`))
			}
		}
		fmt.Printf("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
			rw.scenario, rw.server, fmtRate(rw.acks), fmtRatio(rw.ratio), fmtDur(rw.p50), fmtDur(rw.p99),
			fmtPct(rw.genCPU), fmtPct(rw.srvCPU), fmtMB(rw.rss), strings.Join(notes, "; "))
	}
	fmt.Println()
	fmt.Println("generator CPU % is this process (load generator and target) as % of one core;")
	fmt.Println("server CPU % is Caddy's, from /proc/<pid>/stat (for relay-nats, Caddy's plus its nats-server's, split in the notes); peak RSS is Caddy's VmHWM, file pages included (nats-server's in the notes; a burst's notes give its anonymous part, RssAnon sampled every 100 ms);")
	fmt.Println("\"busy\" is each whole core from /proc/stat (the generator core near 100% with generator CPU % near 100 = generator-bound);")
	fmt.Println("\"other processes\" is what neither this process nor Caddy used of the cores, irq and steal left out.")
	if r.maxOther >= 25 {
		fmt.Printf("WARNING: other processes used up to %.0f%% of a core during some runs: those figures are noisy.\n", r.maxOther)
	}
}

// printTargets checks the figures against the targets of issue 3.
func (r *runner) printTargets() {
	type check struct{ target, figure, goal, met string }
	var out []check
	yes := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT MET"
	}
	for _, b := range []struct {
		kind, goal string
		min        float64
	}{{kindBolt, ">= 0.5x (aim 0.7x)", 0.5}, {kindMemory, ">= 0.8x", 0.8}} {
		xs := r.burstRatios[b.kind]
		if len(xs) == 0 {
			continue
		}
		x := median(xs)
		fig := fmt.Sprintf("%.2fx respond", x)
		if len(xs) > 1 {
			fig += fmt.Sprintf(" (median of %d rounds: %s)", len(xs), fmtRatios(xs))
		}
		out = append(out, check{"1. burst, " + b.kind, fig, b.goal, yes(x >= b.min)})
	}
	if xs := r.toBolt[kindNATS]; len(xs) > 0 {
		x := median(xs)
		fig := fmt.Sprintf("%.2fx relay-bolt", x)
		if len(xs) > 1 {
			fig += fmt.Sprintf(" (median of %d rounds: %s)", len(xs), fmtRatios(xs))
		}
		if rs := r.burstRatios[kindNATS]; len(rs) > 0 {
			fig += fmt.Sprintf("; %.2fx respond", median(rs))
		}
		out = append(out, check{"1. burst, relay-nats", fig, ">= 0.5x relay-bolt in the same rounds", yes(x >= 0.5)})
	} else if rs := r.burstRatios[kindNATS]; len(rs) > 0 {
		out = append(out, check{"1. burst, relay-nats", fmt.Sprintf("%.2fx respond", median(rs)), ">= 0.5x relay-bolt (not run: -servers)", "?"})
	}
	sus := r.sustained[kindBolt]
	if p := r.burst[kindProxy]; p != nil && p.acks > 0 && sus > 0 {
		x := sus / p.acks
		out = append(out, check{"2. sustained, relay-bolt", fmt.Sprintf("%s/s = %.2fx reverse_proxy max (%s/s)", fmtRate(sus), x, fmtRate(p.acks)), ">= 1.0x", yes(x >= 1)})
	} else if sus > 0 {
		out = append(out, check{"2. sustained, relay-bolt", fmtRate(sus) + "/s", ">= reverse_proxy max (not measured)", "?"})
	}
	for _, l := range []struct {
		kind  string
		limit time.Duration
	}{{kindBolt, 3 * time.Millisecond}, {kindNATS, 5 * time.Millisecond}} {
		byMode := r.latencyP99[l.kind]
		h, ok := byMode[modeHealthy]
		if !ok {
			continue
		}
		var floors []string
		if f := r.latencyRespondP99; f > 0 {
			floors = append(floors, "respond at the same rate: "+fmtDur(f))
		}
		if f := r.latencySyncP99; f > 0 && l.kind == kindBolt {
			floors = append(floors, "write+fdatasync alone: "+fmtDur(f))
		}
		fig := fmtDur(h)
		if len(floors) > 0 {
			fig += " (" + strings.Join(floors, "; ") + ")"
		}
		out = append(out, check{"3. ack p99 at " + fmtRate(r.opts.rate) + "/s, " + l.kind, fig, "<= " + fmtDur(l.limit), yes(h <= l.limit)})
		for _, m := range []int32{modeSlow, modeDown} {
			if v, ok := byMode[m]; ok {
				out = append(out, check{
					"3. ack p99, " + modeNames[m] + ", " + l.kind, fmt.Sprintf("%s (%.2fx healthy)", fmtDur(v), float64(v)/float64(h)),
					"<= " + fmtDur(l.limit) + " and within 20%", yes(v <= l.limit && float64(v) <= 1.2*float64(h)),
				})
			}
		}
	}
	if r.drainRate > 0 {
		out = append(out, check{"4. backlog drain", fmtRate(r.drainRate) + " events/s", ">= 10,000/s", yes(r.drainRate >= 10000)})
	}
	if r.restartReady > 0 {
		met := yes(r.restartReady <= 3*time.Second)
		if r.restartN < 1_000_000 {
			met += " (at " + fmtRate(float64(r.restartN)) + " pending; the target is at 1,000,000: -restart-pending 1000000)"
		}
		out = append(out, check{"4. restart with pending", fmt.Sprintf("serving in %.2fs", r.restartReady.Seconds()), "<= 3 s with 1,000,000 pending", met})
	}
	for _, k := range []string{kindBolt, kindMemory, kindNATS, kindBoltJQ} {
		if b := r.burst[k]; b != nil {
			fig := fmtMB(b.rss) + " MB"
			if b.anonRSS > 0 {
				fig += " (anonymous " + fmtMB(b.anonRSS) + " MB)"
			}
			if k == kindNATS {
				fig += " (Caddy's; nats-server's " + fmtMB(b.natsRSS) + " MB more)"
			}
			out = append(out, check{"5. peak RSS in burst, " + k, fig, "<= 150 MB", yes(b.rss <= 150)})
		}
	}
	if fig := r.shapingCost(); fig != "" {
		out = append(out, check{"issue 9: shaping cost, relay-bolt-jq / relay-bolt", fig, "reported (issue 9 sets no goal)", "–"})
	}
	if len(out) == 0 {
		return
	}
	fmt.Println()
	fmt.Println("| issue 3 target (and issue 9's figure) | figure | goal | |")
	fmt.Println("| --- | --- | --- | --- |")
	for _, c := range out {
		fmt.Printf("| %s | %s | %s | %s |\n", c.target, c.figure, c.goal, c.met)
	}
}

// shapingCost compares relay-bolt-jq with relay-bolt of the same run:
// burst acks (the median of the rounds' ratios) and sustained rates; ""
// when relay-bolt-jq did not run.
func (r *runner) shapingCost() string {
	var parts []string
	if xs := r.toBolt[kindBoltJQ]; len(xs) > 0 {
		p := fmt.Sprintf("burst %.2fx", median(xs))
		if len(xs) > 1 {
			p += fmt.Sprintf(" (median of %d rounds: %s)", len(xs), fmtRatios(xs))
		}
		if rs := r.burstRatios[kindBoltJQ]; len(rs) > 0 {
			p += fmt.Sprintf(", %.2fx respond", median(rs))
		}
		parts = append(parts, p)
	} else if rs := r.burstRatios[kindBoltJQ]; len(rs) > 0 {
		parts = append(parts, fmt.Sprintf("burst %.2fx respond (relay-bolt not run: -servers)", median(rs)))
	}
	jq, tried := r.sustained[kindBoltJQ]
	bolt := r.sustained[kindBolt]
	switch {
	case tried && jq == 0:
		parts = append(parts, "sustained: no rate tried kept up")
	case jq > 0 && bolt > 0:
		parts = append(parts, fmt.Sprintf("sustained %.2fx (%s/s against %s/s)", jq/bolt, fmtRate(jq), fmtRate(bolt)))
	case jq > 0:
		parts = append(parts, fmt.Sprintf("sustained %s/s (relay-bolt's not measured)", fmtRate(jq)))
	}
	return strings.Join(parts, "; ")
}

func fmtRate(v float64) string {
	if v < 0 {
		return "–"
	}
	s := strconv.FormatInt(int64(v+0.5), 10)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func fmtRatios(xs []float64) string {
	each := make([]string, len(xs))
	for i, v := range xs {
		each[i] = fmt.Sprintf("%.2fx", v)
	}
	return strings.Join(each, ", ")
}

func fmtRatio(v float64) string {
	if v < 0 {
		return "–"
	}
	return fmt.Sprintf("%.2fx", v)
}

func fmtDur(d time.Duration) string {
	switch {
	case d < 0:
		return "–"
	case d >= time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	case d >= 10*time.Millisecond:
		return fmt.Sprintf("%.0f ms", float64(d)/1e6)
	default:
		return fmt.Sprintf("%.2f ms", float64(d)/1e6)
	}
}

func fmtPct(v float64) string {
	if v < 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f", v)
}

func fmtMB(v float64) string {
	if v < 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f", v)
}
