package relay

import (
	"context"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"time"
)

// Verdict is what a delivery attempt's result means for the event.
type Verdict uint8

const (
	// Done: the target took the event (2xx).
	Done Verdict = iota
	// Again: a transient failure; try later (408, 425, 429, 5xx, timeouts,
	// connection errors).
	Again
	// Reject: the target says the request itself is wrong (other 4xx, and
	// 1xx/3xx, since redirects are not followed): dead-letter at once.
	Reject
)

// Classify maps an attempt's response or error to a verdict.
func Classify(resp *http.Response, err error) Verdict {
	if err != nil {
		return Again
	}
	switch c := resp.StatusCode; {
	case c >= 200 && c < 300:
		return Done
	case c == http.StatusRequestTimeout, c == http.StatusTooEarly, c == http.StatusTooManyRequests, c >= 500:
		return Again
	default:
		return Reject
	}
}

// CheckRetry is go-retryablehttp's CheckRetry, for the quick retries
// inside one delivery attempt. The schedule between attempts is the
// engine's, persisted so that it survives restarts: every status (with
// its Retry-After), a timeout, a refused connection (a target that is
// down, which the breaker holds) and a failed TLS handshake end the
// attempt and wait there. What is left to the client is a connection lost
// mid-request, on a connection it had: reset, a broken pipe, or closed
// before the whole response came, as a restarting target or a load
// balancer dropping connections does. net/http replays such a request
// itself only on a reused connection that failed before anything was
// written or before the first byte of the response; the rest is tried
// again here, a few tens of milliseconds later, as the same attempt.
func CheckRetry(ctx context.Context, _ *http.Response, err error) (bool, error) {
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	if err == nil || !connectionLost(err) {
		return false, nil
	}
	t := triesOf(ctx)
	return t != nil && t.quick && t.connected.Load(), nil
}

// connectionLost reports whether err says the connection went away under
// a request: reset by the peer, a write to a closed connection, or the
// response cut short (before its first byte or in its middle).
func connectionLost(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return false
	}
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// Backoff is the retry curve: the n-th retry waits about Min*2^(n-1),
// never more than Max, with the upper half of each step jittered so that
// retries of many events spread out; a Retry-After longer than that wins,
// up to Max.
type Backoff struct {
	Min, Max time.Duration
	// Rand returns a float in [0,1); nil means math/rand/v2.
	Rand func() float64
	// Now is the clock an HTTP-date Retry-After is read against; nil
	// means time.Now.
	Now func() time.Time
}

// Delay returns how long to wait after the attempt-th failed attempt
// (1-based), given the target's response (nil after a transport error).
func (b Backoff) Delay(attempt int, resp *http.Response) time.Duration {
	if attempt < 1 {
		attempt = 1
	}
	step := float64(b.Min) * math.Pow(2, float64(attempt-1))
	if step > float64(b.Max) || math.IsInf(step, 0) {
		step = float64(b.Max)
	}
	r := rand.Float64
	if b.Rand != nil {
		r = b.Rand
	}
	d := time.Duration(step/2 + r()*step/2)
	if d < b.Min {
		d = b.Min
	}
	if d > b.Max {
		d = b.Max
	}
	now := time.Now
	if b.Now != nil {
		now = b.Now
	}
	if ra, ok := RetryAfter(resp, now()); ok && ra > d {
		d = min(ra, b.Max)
	}
	return d
}

// RetryAfter reads a 429/503 response's Retry-After header, in seconds or
// as an HTTP date.
func RetryAfter(resp *http.Response, now time.Time) (time.Duration, bool) {
	if resp == nil {
		return 0, false
	}
	v := resp.Header.Get("Retry-After")
	if v == "" {
		return 0, false
	}
	if s, err := strconv.ParseInt(v, 10, 64); err == nil {
		if s < 0 {
			return 0, false
		}
		if s > int64(math.MaxInt64/time.Second) {
			return time.Duration(math.MaxInt64), true
		}
		return time.Duration(s) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := t.Sub(now); d > 0 {
			return d, true
		}
		return 0, true
	}
	return 0, false
}

// errAbandoned marks an attempt cut short by the engine's shutdown: it is
// not counted, and the delivery stays pending as it was.
var errAbandoned = errors.New("attempt abandoned: relay shutting down")
