package relay

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// attempt makes one delivery attempt of a leased delivery and settles it
// in the store. It reports whether the target was asked; when it was not
// (the delivery expired, was stale, or could not be shaped), a held
// target's next probe may go at once. gate says the worker holds the
// pacer's gate, which it gives up once its request may go.
func (e *Engine) attempt(t *target, l store.Lease, probe, gate bool) (asked bool) {
	defer func() { t.pace.leave(gate) }()
	tc := t.cfg.Load() // this attempt's settings, whatever a reload does meanwhile
	d := l.Delivery()
	ev := l.Event()
	mark := staleMarkOf(t.name, tc.DropStale, ev.Body)
	if e.isStale(t, mark) {
		e.settleStale(t, tc, l, &d)
		return false
	}
	now := e.now()
	if now.Sub(d.ReceivedAt) > tc.MaxAge {
		d.LastError = ReasonMaxAgeExceeded
		d.LastAttemptAt = now
		e.settle(t, tc, l, &d, store.Dead)
		return false
	}
	// Waiting for the rate is no part of the attempt: neither its
	// timeout nor its number.
	if err := e.pace(e.ctx, t, l, leaseFor(&tc.TargetConfig).Lease); err != nil {
		return true // closing: abandoned, stays pending
	}
	t.pace.leave(gate)
	gate = false

	ctx, cancel := context.WithTimeout(e.ctx, tc.Timeout)
	defer cancel()
	now = e.now()
	req, err := tc.shape.Build(ctx, shape.Input{ID: ev.ID.String(), ReceivedAt: ev.ReceivedAt, ContentType: ev.ContentType, Body: ev.Body}, now)
	if err != nil {
		if e.ctx.Err() != nil {
			return true
		}
		// Nothing was sent: the event cannot be shaped for this target
		// (a transform's error, a value a header cannot carry). No retry
		// can change that; a replay after a config change can.
		d.LastStatus, d.LastError = 0, err.Error()
		d.LastAttemptAt = now
		e.settle(t, tc, l, &d, store.Dead)
		return false
	}
	d.Attempts++
	if d.FirstAttemptAt.IsZero() {
		d.FirstAttemptAt = now
	}
	d.LastAttemptAt = now
	start := time.Now()
	resp, err := e.send(ctx, tc, req, ev, d.Attempts)
	t.metrics.Load().attemptDur.Observe(time.Since(start).Seconds())
	if errors.Is(err, errAbandoned) {
		// Closing: the lease is abandoned with the store, and the
		// delivery stays pending as it was; the next start (or another
		// instance) sends it again.
		return true
	}
	verdict := Classify(resp, err)
	d.LastStatus, d.LastError = 0, ""
	if err != nil {
		d.LastError = err.Error()
	} else {
		d.LastStatus = resp.StatusCode
		if verdict != Done {
			d.LastError = describe(resp)
		}
		drain(resp)
	}
	e.feedBreaker(t, &tc.TargetConfig, &d, verdict, resp, probe)
	switch {
	case verdict == Done:
		e.markDelivered(t, mark, e.keyTTL())
		e.settle(t, tc, l, &d, store.Delivered)
	case verdict == Reject:
		e.settle(t, tc, l, &d, store.Dead)
	case d.Attempts >= tc.MaxAttempts:
		d.LastError = fmt.Sprintf("max attempts (%d) reached: %s", tc.MaxAttempts, d.LastError)
		e.settle(t, tc, l, &d, store.Dead)
	default:
		next := e.now().Add(Backoff{Min: tc.BackoffMin, Max: tc.BackoffMax, Now: e.now}.Delay(d.Attempts, resp))
		if next.Sub(d.ReceivedAt) > tc.MaxAge {
			d.LastError = fmt.Sprintf("%s: %s", ReasonMaxAgeExceeded, d.LastError)
			e.settle(t, tc, l, &d, store.Dead)
			return true
		}
		d.NextAt = next
		e.settle(t, tc, l, &d, store.Retry)
	}
	return true
}

// feedBreaker gives an attempt's verdict to the target's breaker, shares
// a trip, a failed probe or a release with the relay's other instances,
// and logs when it trips or releases. Failures of attempts that were under
// way when the target was held are counted but not shared: the probe's
// schedule is the one that counts.
func (e *Engine) feedBreaker(t *target, tc *TargetConfig, d *store.Delivery, verdict Verdict, resp *http.Response, probe bool) {
	if verdict != Again {
		if t.brk.answered(e.now().UnixNano()) {
			e.shareBreaker(t, func(rec *breakerRecord, _ int64) bool {
				*rec = breakerRecord{}
				return true
			})
			e.log.Info("target answering again: its held deliveries resume",
				zap.String("target", t.name), zap.Int("last_status", d.LastStatus))
		}
		return
	}
	cooldown := func(n int) time.Duration {
		return Backoff{Min: tc.BackoffMin, Max: tc.BackoffMax, Now: e.now}.Delay(n, resp)
	}
	tripped, held := t.brk.failed(e.now().UnixNano(), tc.BackoffMin, cooldown)
	if !held || !(tripped || probe) {
		return
	}
	local := t.brk.snapshot()
	e.shareBreaker(t, func(rec *breakerRecord, _ int64) bool {
		if tripped && rec.Held {
			return false // another instance tripped it first: its schedule stands
		}
		*rec = local
		return true
	})
	if tripped {
		e.log.Warn("target failing: its deliveries are held, one probe at a time until it answers",
			zap.String("target", t.name), zap.Int("failures_in_a_row", tripAfter), zap.String("error", d.LastError))
	}
}

// settle records an attempt's outcome without waiting for it to be
// durable: the worker goes on to its next delivery, and the outcome shares
// its commit with acks and other outcomes. The counters move once it is
// durable. A crash before then loses the outcome, so the attempt is made
// again: at least once.
func (e *Engine) settle(t *target, tc *settings, l store.Lease, d *store.Delivery, o store.Outcome) {
	l.Settle(o, d, func(err error) { e.settled(t, tc, l, d, o, err) })
}

// settleStale removes a delivery whose event is older than one already
// delivered for its drop_stale key: nothing is sent, nothing stays
// pending or dead.
func (e *Engine) settleStale(t *target, tc *settings, l store.Lease, d *store.Delivery) {
	e.recordStale(t, d)
	l.Settle(store.Delivered, d, func(err error) {
		if err != nil {
			e.settleFailed(t, tc, l, d, err)
			return
		}
		e.burst.settled.Add(1)
		t.metrics.Load().stale.inc(e.now())
		if ce := e.log.Check(zapcore.DebugLevel, "stale: an event newer for the same key was delivered"); ce != nil {
			ce.Write(zap.String("event_id", d.ID.String()), zap.String("target", t.name))
		}
	})
}

// settleFailed handles an outcome the store could not record: the
// delivery stays pending as last stored. While the engine runs, it is
// tried again later (at least once: a delivered event may go out again);
// on shutdown the next start sends it.
func (e *Engine) settleFailed(t *target, tc *settings, l store.Lease, d *store.Delivery, err error) {
	if e.ctx.Err() != nil {
		return
	}
	// A full disk fails every settle: log once in a while, not once per
	// delivery.
	if n := e.settleErrors.Add(1); e.logEvery(&e.settleLogged, 10*time.Second) {
		e.log.Error("recording delivery attempt", zap.String("event_id", d.ID.String()),
			zap.String("target", t.name), zap.Int64("failures_so_far", n), zap.Error(err))
	}
	l.Postpone(e.now().Add(tc.BackoffMax))
}

func (e *Engine) settled(t *target, tc *settings, l store.Lease, d *store.Delivery, o store.Outcome, err error) {
	if err != nil {
		e.settleFailed(t, tc, l, d, err)
		return
	}
	m := t.metrics.Load()
	if o != store.Retry {
		e.burst.settled.Add(1)
	}
	switch o {
	case store.Delivered:
		m.delivered.inc(e.now())
		m.latency.Observe(e.now().Sub(d.ReceivedAt).Seconds())
		if ce := e.log.Check(zapcore.DebugLevel, "delivered"); ce != nil {
			ce.Write(zap.String("event_id", d.ID.String()), zap.String("target", t.name), zap.Int("attempt", d.Attempts))
		}
	case store.Retry:
		m.retried.inc(e.now())
		if ce := e.log.Check(zapcore.DebugLevel, "delivery failed, will retry"); ce != nil {
			ce.Write(zap.String("event_id", d.ID.String()), zap.String("target", t.name), zap.Int("attempt", d.Attempts),
				zap.Time("next_attempt", d.NextAt), zap.String("error", d.LastError))
		}
	case store.Dead:
		m.dead.inc(e.now())
		e.log.Warn("delivery dead-lettered",
			zap.String("event_id", d.ID.String()), zap.String("target", t.name),
			zap.Int("attempt", d.Attempts), zap.Int("max_attempts", tc.MaxAttempts),
			zap.Int("last_status", d.LastStatus), zap.String("error", d.LastError))
	}
}
