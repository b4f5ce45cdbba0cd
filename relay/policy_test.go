package relay

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

func response(code int, retryAfter string) *http.Response {
	h := http.Header{}
	if retryAfter != "" {
		h.Set("Retry-After", retryAfter)
	}
	return &http.Response{StatusCode: code, Status: strconv.Itoa(code) + " " + http.StatusText(code), Header: h}
}

func TestClassify(t *testing.T) {
	tests := []struct {
		code int
		want Verdict
	}{
		{200, Done},
		{201, Done},
		{202, Done},
		{204, Done},
		{299, Done},
		{100, Reject},
		{301, Reject},
		{302, Reject},
		{304, Reject},
		{307, Reject},
		{400, Reject},
		{401, Reject},
		{403, Reject},
		{404, Reject},
		{405, Reject},
		{408, Again},
		{409, Reject},
		{410, Reject},
		{413, Reject},
		{422, Reject},
		{425, Again},
		{429, Again},
		{500, Again},
		{501, Again},
		{502, Again},
		{503, Again},
		{504, Again},
		{599, Again},
	}
	for _, tt := range tests {
		t.Run(strconv.Itoa(tt.code), func(t *testing.T) {
			if got := Classify(response(tt.code, ""), nil); got != tt.want {
				t.Errorf("Classify(%d) = %v, want %v", tt.code, got, tt.want)
			}
		})
	}
	t.Run("transport error", func(t *testing.T) {
		if got := Classify(nil, errors.New("connection refused")); got != Again {
			t.Errorf("Classify(transport error) = %v, want Again", got)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		if got := Classify(nil, context.DeadlineExceeded); got != Again {
			t.Errorf("Classify(timeout) = %v, want Again", got)
		}
	})
}

// TestCheckRetry: only a connection lost under a request, on a
// connection the try had, is tried again within the attempt; every status,
// timeout, refusal and TLS failure is left to the persisted schedule.
func TestCheckRetry(t *testing.T) {
	connected := func(quick, conn bool) context.Context {
		ctx := withTries(context.Background(), quick)
		triesOf(ctx).connected.Store(conn)
		return ctx
	}
	onConn := connected(true, true)
	cancelled, cancel := context.WithCancel(onConn)
	cancel()
	opErr := func(op string, err error) error {
		return &url.Error{Op: "Post", URL: "http://127.0.0.1:1/", Err: &net.OpError{Op: op, Net: "tcp", Err: &os.SyscallError{Syscall: op, Err: err}}}
	}
	reset := opErr("read", syscall.ECONNRESET)
	tests := []struct {
		name    string
		ctx     context.Context
		resp    *http.Response
		err     error
		want    bool
		wantErr bool
	}{
		{"reset", onConn, nil, reset, true, false},
		{"aborted", onConn, nil, opErr("read", syscall.ECONNABORTED), true, false},
		{"broken pipe", onConn, nil, fmt.Errorf("net/http: HTTP/1.x transport connection broken: %w", opErr("write", syscall.EPIPE)), true, false},
		{"closed before the response", onConn, nil, &url.Error{Op: "Post", URL: "u", Err: io.EOF}, true, false},
		{"response cut short", onConn, nil, &url.Error{Op: "Post", URL: "u", Err: io.ErrUnexpectedEOF}, true, false},
		{"reset before a connection (TLS handshake)", connected(true, false), nil, reset, false, false},
		{"closed before a connection (TLS handshake)", connected(true, false), nil, &url.Error{Op: "Post", URL: "u", Err: io.EOF}, false, false},
		{"reset on a rated target", connected(false, true), nil, reset, false, false},
		{"reset outside the engine's requests", context.Background(), nil, reset, false, false},
		{"refused", onConn, nil, &url.Error{Op: "Post", URL: "u", Err: &net.OpError{Op: "dial", Net: "tcp", Err: &os.SyscallError{Syscall: "connect", Err: syscall.ECONNREFUSED}}}, false, false},
		{"timeout", onConn, nil, &url.Error{Op: "Post", URL: "u", Err: context.DeadlineExceeded}, false, false},
		{"read timeout", onConn, nil, &url.Error{Op: "Post", URL: "u", Err: &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}}, false, false},
		{"TLS alert", onConn, nil, &url.Error{Op: "Post", URL: "u", Err: &net.OpError{Op: "remote error", Err: tls.AlertError(40)}}, false, false},
		{"certificate", onConn, nil, &url.Error{Op: "Post", URL: "u", Err: &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}}, false, false},
		{"other transport error", onConn, nil, errors.New("something else"), false, false},
		{"2xx", onConn, response(204, ""), nil, false, false},
		{"5xx", onConn, response(503, "1"), nil, false, false},
		{"429", onConn, response(429, "1"), nil, false, false},
		{"other 4xx", onConn, response(422, ""), nil, false, false},
		{"redirect", onConn, response(302, ""), nil, false, false},
		{"context done", cancelled, response(503, ""), nil, false, true},
		{"context done after a reset", cancelled, nil, reset, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := CheckRetry(tt.ctx, tt.resp, tt.err)
			if got != tt.want || (err != nil) != tt.wantErr {
				t.Errorf("CheckRetry = %v, %v; want %v, error %v", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestBackoffBounds(t *testing.T) {
	tests := []struct {
		name     string
		min, max time.Duration
	}{
		{"defaults", DefaultBackoffMin, DefaultBackoffMax},
		{"tight", 5 * time.Millisecond, 50 * time.Millisecond},
		{"min equals max", time.Second, time.Second},
		{"huge max", time.Millisecond, 1000 * time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, r := range []float64{0, 0.5, 0.999} {
				b := Backoff{Min: tt.min, Max: tt.max, Rand: func() float64 { return r }}
				prev := time.Duration(0)
				for attempt := 1; attempt <= 30; attempt++ {
					d := b.Delay(attempt, nil)
					if d < tt.min || d > tt.max {
						t.Fatalf("rand %v attempt %d: delay %s outside [%s, %s]", r, attempt, d, tt.min, tt.max)
					}
					if d < prev {
						t.Fatalf("rand %v attempt %d: delay %s shrank from %s", r, attempt, d, prev)
					}
					prev = d
				}
				if reach := float64(tt.min) * (1 << 29); reach >= float64(tt.max) && b.Delay(30, nil) < tt.max/2 {
					t.Errorf("rand %v: delay after 30 attempts %s, want near max %s", r, b.Delay(30, nil), tt.max)
				}
			}
		})
	}
	t.Run("attempt below 1 counts as 1", func(t *testing.T) {
		b := Backoff{Min: time.Second, Max: time.Minute, Rand: func() float64 { return 0.5 }}
		if got, want := b.Delay(0, nil), b.Delay(1, nil); got != want {
			t.Errorf("Delay(0) = %s, want Delay(1) = %s", got, want)
		}
	})
	t.Run("real jitter stays in bounds", func(t *testing.T) {
		b := Backoff{Min: 10 * time.Millisecond, Max: time.Second}
		for attempt := 1; attempt <= 30; attempt++ {
			if d := b.Delay(attempt, nil); d < b.Min || d > b.Max {
				t.Fatalf("attempt %d: delay %s outside [%s, %s]", attempt, d, b.Min, b.Max)
			}
		}
	})
}

// TestBackoffJitter pins the curve: the n-th retry waits between half and
// all of Min*2^(n-1), the jitter spreading the upper half.
func TestBackoffJitter(t *testing.T) {
	min, max := 100*time.Millisecond, 100*time.Second
	low := Backoff{Min: min, Max: max, Rand: func() float64 { return 0 }}
	high := Backoff{Min: min, Max: max, Rand: func() float64 { return 0.999 }}
	tests := []struct {
		attempt   int
		low, high time.Duration // expected, within 1ms
	}{
		{1, min, min}, // step = min: jitter floored at min
		{2, min, 200 * time.Millisecond},
		{3, 200 * time.Millisecond, 400 * time.Millisecond},
		{4, 400 * time.Millisecond, 800 * time.Millisecond},
		{5, 800 * time.Millisecond, 1600 * time.Millisecond},
		{11, max / 2, 99950 * time.Millisecond}, // step 102.4s capped at max
		{20, max / 2, 99950 * time.Millisecond},
	}
	near := func(got, want time.Duration) bool {
		d := got - want
		return d > -time.Millisecond && d < time.Millisecond
	}
	for _, tt := range tests {
		if got := low.Delay(tt.attempt, nil); !near(got, tt.low) {
			t.Errorf("attempt %d, rand 0: %s, want %s", tt.attempt, got, tt.low)
		}
		if got := high.Delay(tt.attempt, nil); !near(got, tt.high) {
			t.Errorf("attempt %d, rand 0.999: %s, want %s", tt.attempt, got, tt.high)
		}
	}
}

func TestBackoffRetryAfter(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	b := Backoff{
		Min:  time.Second,
		Max:  time.Minute,
		Rand: func() float64 { return 0 },
		Now:  func() time.Time { return now },
	}
	date := func(d time.Duration) string { return now.Add(d).Format(http.TimeFormat) }
	tests := []struct {
		name       string
		retryAfter string
		attempt    int
		want       time.Duration
	}{
		{"seconds, larger", "30", 1, 30 * time.Second},
		{"seconds, capped at max", "3600", 1, time.Minute},
		{"seconds, huge", "99999999999999999", 1, time.Minute},
		{"seconds, smaller than backoff", "1", 4, 4 * time.Second},
		{"zero", "0", 1, time.Second},
		{"negative", "-5", 1, time.Second},
		{"garbage", "soon", 1, time.Second},
		{"fractional seconds", "1.5", 1, time.Second},
		{"HTTP date, larger", date(45 * time.Second), 1, 45 * time.Second},
		{"HTTP date, capped at max", date(2 * time.Hour), 1, time.Minute},
		{"HTTP date, in the past", date(-time.Hour), 1, time.Second},
		{"HTTP date, smaller than backoff", date(2 * time.Second), 4, 4 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, code := range []int{429, 503} {
				if got := b.Delay(tt.attempt, response(code, tt.retryAfter)); got != tt.want {
					t.Errorf("%d with Retry-After %q after attempt %d: delay %s, want %s", code, tt.retryAfter, tt.attempt, got, tt.want)
				}
			}
		})
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name   string
		resp   *http.Response
		want   time.Duration
		wantOK bool
	}{
		{"no response", nil, 0, false},
		{"no header", response(503, ""), 0, false},
		{"seconds", response(503, "120"), 2 * time.Minute, true},
		{"date", response(429, now.Add(90*time.Second).Format(http.TimeFormat)), 90 * time.Second, true},
		{"past date", response(429, now.Add(-time.Minute).Format(http.TimeFormat)), 0, true},
		{"garbage", response(503, "tomorrow"), 0, false},
		{"negative", response(503, "-1"), 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := RetryAfter(tt.resp, now)
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("RetryAfter = %s, %v; want %s, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
}
