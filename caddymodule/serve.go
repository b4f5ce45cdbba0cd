package caddymodule

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/tidwall/gjson"
	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

// bodies are pooled read buffers: the store copies what it keeps.
var bodies = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// ServeHTTP acks an event once it is stored. Checks run in the contract's
// order: method, auth (before any of the body is read), size, JSON.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	start := time.Now()
	e := h.engine
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		reply(w, http.StatusMethodNotAllowed, "method not allowed: POST only\n")
		e.Observe(relay.ResultInvalid, time.Since(start))
		return nil
	}
	if h.auth != nil && !h.auth.Check(r.Header) {
		reply(w, http.StatusUnauthorized, "unauthorized\n")
		e.Observe(relay.ResultUnauthorized, time.Since(start))
		return nil
	}
	cfg := e.Config()
	if r.ContentLength > cfg.MaxBody {
		reply(w, http.StatusRequestEntityTooLarge, "body too large\n")
		e.Observe(relay.ResultTooLarge, time.Since(start))
		return nil
	}
	buf := bodies.Get().(*bytes.Buffer)
	buf.Reset()
	defer func() {
		if buf.Cap() <= 4*int(cfg.MaxBody) && buf.Cap() <= 8<<20 {
			bodies.Put(buf)
		}
	}()
	n, err := buf.ReadFrom(io.LimitReader(r.Body, cfg.MaxBody+1))
	if n > cfg.MaxBody {
		reply(w, http.StatusRequestEntityTooLarge, "body too large\n")
		e.Observe(relay.ResultTooLarge, time.Since(start))
		return nil
	}
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			reply(w, http.StatusRequestEntityTooLarge, "body too large\n")
			e.Observe(relay.ResultTooLarge, time.Since(start))
			return nil
		}
		reply(w, http.StatusBadRequest, "could not read the request body\n")
		e.Observe(relay.ResultInvalid, time.Since(start))
		return nil
	}
	body := buf.Bytes()
	if cfg.Source != relay.SourceGeneric && !isJSONObject(body) {
		reply(w, http.StatusBadRequest, "body is not a JSON object\n")
		e.Observe(relay.ResultInvalid, time.Since(start))
		return nil
	}
	res, err := e.Receive(r.Context(), body, r.Header.Get("Content-Type"))
	if errors.Is(err, relay.ErrUnavailable) && e.IsNew() {
		// A request beat the webhook_relay app's Start: open here.
		if oerr := e.Open(); oerr == nil {
			res, err = e.Receive(r.Context(), body, r.Header.Get("Content-Type"))
		}
	}
	if errors.Is(err, relay.ErrTooLarge) {
		// The store can never hold it (a NATS server's max_payload under
		// max_body): a 503 would be retried for ever.
		reply(w, http.StatusRequestEntityTooLarge, "body too large for the relay's store\n")
		e.Observe(relay.ResultTooLarge, time.Since(start))
		if ce := h.logger.Check(zap.WarnLevel, "event refused: too large for the store"); ce != nil {
			ce.Write(zap.String("relay", cfg.Name), zap.Error(err))
		}
		return nil
	}
	if err != nil {
		w.Header().Set("Retry-After", strconv.Itoa(int((cfg.RetryAfter+time.Second-1)/time.Second)))
		reply(w, http.StatusServiceUnavailable, "relay unavailable, retry later\n")
		e.Observe(relay.ResultUnavailable, time.Since(start))
		// A full store or disk refuses every request: log the first
		// refusal, then at most one a second (received_total counts all).
		if now := time.Now().UnixNano(); now-h.lastRefusalLog.Load() >= int64(time.Second) {
			h.lastRefusalLog.Store(now)
			if ce := h.logger.Check(zap.WarnLevel, "event not accepted"); ce != nil {
				ce.Write(zap.String("relay", cfg.Name), zap.Error(err))
			}
		}
		return nil
	}
	status, result := "accepted", relay.ResultAccepted
	if res.Duplicate {
		status, result = "duplicate", relay.ResultDuplicate
	}
	var out [80]byte
	b := append(out[:0], `{"status":"`...)
	b = append(b, status...)
	b = append(b, `","event_id":"`...)
	b = append(b, res.EventID.String()...)
	b = append(b, "\"}\n"...)
	hdr := w.Header()
	hdr["Content-Type"] = jsonType
	hdr["Content-Length"] = []string{strconv.Itoa(len(b))}
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
	e.Observe(result, time.Since(start))
	return nil
}

var jsonType = []string{"application/json"}

// isJSONObject reports whether body is valid JSON whose top level is an
// object: every payload of the okhi source is.
func isJSONObject(body []byte) bool {
	if !gjson.ValidBytes(body) {
		return false
	}
	return gjson.ParseBytes(body).IsObject()
}

func reply(w http.ResponseWriter, status int, msg string) {
	h := w.Header()
	if status != http.StatusBadRequest && status != http.StatusServiceUnavailable {
		// 401, 405 and 413 answer before the body is read. Without this,
		// net/http reads up to 256 KiB of it (or waits for it until the
		// read timeout) to keep the connection: Caddy wraps the body, so
		// the server cannot tell that nobody will read it. A client that
		// sent Expect: 100-continue would wait for that timeout too.
		h.Set("Connection", "close")
	}
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, msg)
}
