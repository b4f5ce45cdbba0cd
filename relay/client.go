package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-retryablehttp"

	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// Headers of forwarded requests.
const (
	HeaderIdempotencyKey = "Idempotency-Key"
	HeaderAttempt        = "X-Webhook-Relay-Attempt"
	HeaderTarget         = "X-Webhook-Relay-Target"
)

// UserAgent names the relay and its version in forwarded requests.
var UserAgent = "caddy-webhook-relay/" + Version

// Quick retries inside one attempt (see CheckRetry): at most
// quickRetries more tries, the n-th after n times a wait drawn between
// quickWaitMin and quickWaitMax, all under the attempt's timeout.
const (
	quickRetries = 2
	quickWaitMin = 10 * time.Millisecond
	quickWaitMax = 30 * time.Millisecond
)

// newClient returns one target's HTTP client: go-retryablehttp making the
// quick retries of one attempt after a connection lost mid-request (the
// schedule between attempts is persisted by the engine), no redirects, no
// proxy from the environment, no compression (the target gets exactly the
// contract's headers), its own connections (so that one target's failures
// close no other target's).
//
// go-retryablehttp closes all idle connections of the client after every
// failed call; against a target answering 503 that means a new TCP
// connection per attempt, and one worker's lost connection would close
// the idle keep-alive connections of the target's other workers. A
// broken connection never goes back to the pool anyway, so nothing is
// gained: the transport is wrapped so that the client cannot close them,
// and the engine does, when the target goes or the engine closes.
func newClient(concurrency int, tlsConf *tls.Config) (*retryablehttp.Client, *http.Transport) {
	tr := &http.Transport{
		TLSClientConfig: tlsConf,
		Proxy:           nil,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		MaxIdleConns:          max(concurrency, 2) * 2,
		MaxIdleConnsPerHost:   max(concurrency, 2) * 2,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true,
	}
	return &retryablehttp.Client{
		HTTPClient: &http.Client{
			Transport: keepConns{tr},
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
		Logger:       nil,
		RetryMax:     quickRetries,
		RetryWaitMin: quickWaitMin,
		RetryWaitMax: quickWaitMax,
		CheckRetry:   CheckRetry,
		// Jittered, so that the workers that lost their connections to a
		// restarting target at once do not all come back at once.
		Backoff:      retryablehttp.LinearJitterBackoff,
		ErrorHandler: countTries,
	}, tr
}

// keepConns is a RoundTripper without CloseIdleConnections.
type keepConns struct{ rt http.RoundTripper }

func (k keepConns) RoundTrip(r *http.Request) (*http.Response, error) { return k.rt.RoundTrip(r) }

// countTries passes the last try's result through, and says in its error
// how many tries the attempt made, for last_error.
func countTries(resp *http.Response, err error, tries int) (*http.Response, error) {
	if err != nil && tries > 1 {
		err = fmt.Errorf("%w (%d tries within the attempt)", err, tries)
	}
	return resp, err
}

// tries is what CheckRetry knows of one attempt beyond its result,
// carried in the request's context.
type tries struct {
	// quick: the attempt may be tried again quickly. Not on a target
	// with a rate, whose every request waits for it.
	quick bool
	// connected: the last try had a connection, dialled (and its TLS
	// handshake done) or reused; a connection lost before that is a
	// target refusing or failing its handshake, for the persisted
	// schedule.
	connected atomic.Bool
}

type triesKey struct{}

// withTries returns ctx carrying a fresh tries.
func withTries(ctx context.Context, quick bool) context.Context {
	t := &tries{quick: quick}
	ctx = context.WithValue(ctx, triesKey{}, t)
	return httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		// net/http asks for a connection once per try of its own (it
		// replays some failures on a reused connection itself).
		GetConn: func(string) { t.connected.Store(false) },
		GotConn: func(httptrace.GotConnInfo) { t.connected.Store(true) },
	})
}

// triesOf returns the tries in ctx, or nil.
func triesOf(ctx context.Context) *tries {
	t, _ := ctx.Value(triesKey{}).(*tries)
	return t
}

// send makes one HTTP attempt of a shaped request, under ctx (the
// attempt's timeout, which bounds its quick retries too), with the
// contract's headers over the pipeline's. Every try of the attempt sends
// the same request: the same attempt number, signature and body.
func (e *Engine) send(ctx context.Context, tc *settings, r shape.Request, ev *store.Event, attempt int) (*http.Response, error) {
	ctx = withTries(ctx, tc.Rate.Interval() == 0)
	req, err := retryablehttp.NewRequestWithContext(ctx, r.Method, r.URL, r.Body)
	if err != nil {
		return nil, err
	}
	req.Header = contractHeaders(r.Header, tc.Name, ev.ID, attempt)
	resp, err := tc.client.Do(req)
	if err != nil {
		if resp != nil {
			// CheckRetry reports a done context together with a response
			// that arrived meanwhile: close it, or its connection leaks.
			drain(resp)
		}
		if e.ctx.Err() != nil {
			return nil, errAbandoned
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("timeout after %s", tc.Timeout)
		}
		return nil, err
	}
	// The body is read after send returns, within the attempt's context;
	// the caller cancels it once done.
	return resp, nil
}

// contractHeaders puts the contract's headers over a built request's
// (h, which may be nil) and returns them.
func contractHeaders(h http.Header, target string, id store.ID, attempt int) http.Header {
	if h == nil {
		h = make(http.Header, 4)
	}
	if h.Get("User-Agent") == "" {
		h.Set("User-Agent", UserAgent)
	}
	h.Set(HeaderIdempotencyKey, id.String())
	h.Set(HeaderAttempt, strconv.Itoa(attempt))
	h.Set(HeaderTarget, target)
	return h
}

// describe says what a failed response was, with the start of its body.
func describe(resp *http.Response) string {
	var buf [256]byte
	n, _ := io.ReadFull(resp.Body, buf[:])
	msg := bytes.TrimSpace(buf[:n])
	if len(msg) == 0 {
		return resp.Status
	}
	return resp.Status + ": " + string(msg)
}

// drain reads what is left of a response (up to a bound) so that its
// connection can be reused, then closes it.
func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}
