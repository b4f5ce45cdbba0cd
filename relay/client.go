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
	"strconv"
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

// newClient returns one target's HTTP client: go-retryablehttp making one
// attempt per call (the schedule between attempts is persisted by the
// engine), no redirects, no proxy from the environment, no compression
// (the target gets exactly the contract's headers), its own connections
// (so that one target's failures close no other target's).
//
// go-retryablehttp closes all idle connections after every failed
// attempt; against a target answering 503 that means a new TCP connection
// per attempt. The transport is wrapped so that the client cannot close
// them: the engine does, when the target goes or the engine closes.
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
		RetryMax:     0,
		RetryWaitMin: DefaultBackoffMin,
		RetryWaitMax: DefaultBackoffMax,
		CheckRetry:   CheckRetry,
		Backoff:      BackoffFunc,
		ErrorHandler: retryablehttp.PassthroughErrorHandler,
	}, tr
}

// keepConns is a RoundTripper without CloseIdleConnections.
type keepConns struct{ rt http.RoundTripper }

func (k keepConns) RoundTrip(r *http.Request) (*http.Response, error) { return k.rt.RoundTrip(r) }

// send makes one HTTP attempt of a shaped request, under ctx (the
// attempt's timeout), with the contract's headers over the pipeline's.
func (e *Engine) send(ctx context.Context, tc *settings, r shape.Request, ev *store.Event, attempt int) (*http.Response, error) {
	req, err := retryablehttp.NewRequestWithContext(ctx, r.Method, r.URL, r.Body)
	if err != nil {
		return nil, err
	}
	h := r.Header
	if h == nil {
		h = make(http.Header, 4)
	}
	if h.Get("User-Agent") == "" {
		h.Set("User-Agent", UserAgent)
	}
	h.Set(HeaderIdempotencyKey, ev.ID.String())
	h.Set(HeaderAttempt, strconv.Itoa(attempt))
	h.Set(HeaderTarget, tc.Name)
	req.Header = h
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
