package natsstore

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/webhook-relay/caddy-webhook-relay/relay/store"
)

// Headers of the messages this package writes, beside NATS's own.
const (
	hdrReceivedAt  = "Relay-Received-At" // unix ns of the event's receipt
	hdrContentType = "Content-Type"
	hdrDelivery    = "Relay-Delivery" // a dead letter's delivery record (JSON)
	// hdrOrderKey is a delivery's order key, Go-quoted in ASCII: a key
	// taken from a payload may hold what a header cannot.
	hdrOrderKey = "Relay-Order-Key"
)

// token turns a target name into one subject token, a consumer name and
// part of a KV key: names made of [A-Za-z0-9_-] stay as they are (readable
// in the nats CLI), any other becomes "=" and its base64url bytes, which no
// plain name can start with.
func token(target string) string {
	plain := target != ""
	for i := 0; i < len(target) && plain; i++ {
		c := target[i]
		plain = c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
	}
	if plain {
		return target
	}
	return "=" + base64.RawURLEncoding.EncodeToString([]byte(target))
}

// targetOf reverses token.
func targetOf(tok string) (string, error) {
	if !strings.HasPrefix(tok, "=") {
		return tok, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(tok[1:])
	if err != nil {
		return "", fmt.Errorf("decoding target token %q: %w", tok, err)
	}
	return string(b), nil
}

// names are the subjects and JetStream objects of one relay's stream.
type names struct {
	stream, dead         string
	keys, attempts, stat string
}

func namesFor(stream string) names {
	return names{
		stream:   stream,
		dead:     stream + "_DEAD",
		keys:     stream + "_KEYS",
		attempts: stream + "_ATTEMPTS",
		stat:     stream + "_STATE",
	}
}

// pendingSubject is where (event, target)'s delivery lives: one subject per
// pair, so that a publish can insist that none is stored yet, and a lookup
// by event id is a subject filter. A delivery with an order key has the
// key's token (keyToken) before the event id, so that the deliveries of
// one key at a target are one subject filter too (keyFilter), which the
// queue's head check reads.
func (n names) pendingSubject(tok, keyTok string, id store.ID) string {
	if keyTok == "" {
		return n.stream + ".d." + tok + "." + id.String()
	}
	return n.stream + ".d." + tok + "." + keyTok + "." + id.String()
}

// pendingFilter matches every delivery at a target, with an order key or
// without.
func (n names) pendingFilter(tok string) string { return n.stream + ".d." + tok + ".>" }

// keyFilter matches the deliveries of one order key at a target.
func (n names) keyFilter(tok, keyTok string) string {
	return n.stream + ".d." + tok + "." + keyTok + ".*"
}

func (n names) deadSubject(tok string, id store.ID) string {
	return n.dead + "." + tok + "." + id.String()
}

func (n names) deadFilter(tok string) string { return n.dead + "." + tok + ".*" }

// splitSubject returns the target, the order key's token ("" for none)
// and the event id of a pending or dead subject, told apart by how many
// tokens they have (stream names have no dots): S_DEAD.<target>.<id>,
// S.d.<target>.<id>, S.d.<target>.<key>.<id>.
func splitSubject(subj string) (target, keyTok string, id store.ID, err error) {
	var toks [6]string
	n := 0
	for rest := subj; n < len(toks); n++ {
		i := strings.IndexByte(rest, '.')
		if i < 0 {
			toks[n] = rest
			n++
			break
		}
		toks[n], rest = rest[:i], rest[i+1:]
	}
	var tok string
	switch n {
	case 3:
		tok = toks[1]
	case 4:
		tok = toks[2]
	case 5:
		tok, keyTok = toks[2], toks[3]
	default:
		return "", "", id, fmt.Errorf("subject %q is no delivery's", subj)
	}
	if id, err = store.ParseID(toks[n-1]); err != nil {
		return "", "", id, fmt.Errorf("subject %q: %w", subj, err)
	}
	if target, err = targetOf(tok); err != nil {
		return "", "", id, err
	}
	return target, keyTok, id, nil
}

// subjectToken is the target token of a pending or dead subject, "" when
// it is neither.
func subjectToken(subj string) string {
	toks := strings.Split(subj, ".")
	switch len(toks) {
	case 3:
		return toks[1]
	case 4, 5:
		return toks[2]
	}
	return ""
}

func attemptKey(tok string, id store.ID) string { return tok + "." + id.String() }

// record is a delivery's state as JSON: in the attempts bucket and in a
// dead letter's header. Times are unix ns, 0 for none.
type record struct {
	Attempts       int    `json:"attempts,omitempty"`
	NextAt         int64  `json:"next_at,omitempty"`
	FirstAttemptAt int64  `json:"first_attempt_at,omitempty"`
	LastAttemptAt  int64  `json:"last_attempt_at,omitempty"`
	LastStatus     int    `json:"last_status,omitempty"`
	LastError      string `json:"last_error,omitempty"`
	// OrderKey is kept with a dead letter, so that a replay keeps it.
	OrderKey string `json:"order_key,omitempty"`
}

// maxErrorLen bounds a stored error; the bbolt store keeps the same.
const maxErrorLen = 1024

func ns(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromNs(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

func encodeRecord(d *store.Delivery) []byte {
	e := d.LastError
	if len(e) > maxErrorLen {
		e = e[:maxErrorLen]
	}
	b, _ := json.Marshal(record{
		Attempts:       d.Attempts,
		NextAt:         ns(d.NextAt),
		FirstAttemptAt: ns(d.FirstAttemptAt),
		LastAttemptAt:  ns(d.LastAttemptAt),
		LastStatus:     d.LastStatus,
		LastError:      e,
		OrderKey:       d.OrderKey,
	})
	return b
}

func decodeRecord(b []byte, d *store.Delivery) error {
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("decoding delivery record: %w", err)
	}
	d.Attempts = r.Attempts
	d.NextAt = fromNs(r.NextAt)
	d.FirstAttemptAt = fromNs(r.FirstAttemptAt)
	d.LastAttemptAt = fromNs(r.LastAttemptAt)
	d.LastStatus = r.LastStatus
	d.LastError = r.LastError
	if r.OrderKey != "" {
		d.OrderKey = r.OrderKey
	}
	return nil
}

func receivedAt(h nats.Header) time.Time {
	n, _ := strconv.ParseInt(h.Get(hdrReceivedAt), 10, 64)
	return fromNs(n)
}

// isWrongLastSeq reports a publish refused because its subject already
// holds a message (or another revision than the one expected).
func isWrongLastSeq(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// errCodeMsgIDInProcess is JSStreamDuplicateMessageConflict: a publish
// with the same Nats-Msg-Id is still being proposed. nats.go has no name
// for it.
const errCodeMsgIDInProcess jetstream.ErrorCode = 10158

// inProcess reports a replicated stream's answer that another publish with
// the same message id, or to the same subject under an expected last
// sequence, is still being proposed (10158; 10164, which a single
// publish gets for nothing else): whether it stores is not known yet.
func inProcess(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == errCodeMsgIDInProcess ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// askWait bounds one request on the intake path and in setup. A request
// that reached a server as it went away (the node of a stream's leader
// shutting down), or that came while a cluster had no leader for it yet
// (starting, electing), is never answered: waiting for it would spend the
// whole budget, where the same request a moment later is answered.
const askWait = time.Second

// unanswered runs op with at most askWait of ctx's time, and again while
// that is not enough and ctx has time left. Only for requests that can be
// repeated: a publish with its message id and expected last sequence, a
// key created only if absent, a stream or consumer created or updated to
// one config, a read.
func unanswered(ctx context.Context, op func(ctx context.Context) error) error {
	for {
		actx, cancel := context.WithTimeout(ctx, askWait)
		err := op(actx)
		cancel()
		if err == nil || ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, nats.ErrTimeout) {
			return err
		}
	}
}

// unavailable marks err as the server's, not the caller's: intake answers
// 503 and the sender retries.
func unavailable(what string, err error) error {
	if errors.Is(err, store.ErrUnavailable) {
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %w: %w", what, store.ErrUnavailable, err)
}

// rawMsg is one message read with a direct get.
type rawMsg struct {
	subject string
	seq     uint64
	header  nats.Header
	data    []byte
}

// directBatch reads up to batch messages of stream matching filter, from
// sequence from on, in one batched direct get (the stream allows direct
// access), and returns them with how many more match after the last one.
// nats.go offers batched direct gets only through its orbit module; the
// request is three fields of the server's API.
func directBatch(ctx context.Context, nc *nats.Conn, stream, filter string, from uint64, batch int) ([]rawMsg, uint64, error) {
	req, _ := json.Marshal(struct {
		Seq     uint64 `json:"seq"`
		NextFor string `json:"next_by_subj"`
		Batch   int    `json:"batch"`
	}{from, filter, batch})
	inbox := nc.NewInbox()
	ch := make(chan *nats.Msg, batch+1)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return nil, 0, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest("$JS.API.DIRECT.GET."+stream, inbox, req); err != nil {
		return nil, 0, err
	}
	var out []rawMsg
	for {
		select {
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case m := <-ch:
			switch m.Header.Get("Status") {
			case "":
			case "404":
				return out, 0, nil
			case "204":
				left, _ := strconv.ParseUint(m.Header.Get("Nats-Num-Pending"), 10, 64)
				return out, left, nil
			case "503":
				return nil, 0, nats.ErrNoResponders
			default:
				return nil, 0, fmt.Errorf("direct get on %s: status %s %s", stream, m.Header.Get("Status"), m.Header.Get("Description"))
			}
			seq, _ := strconv.ParseUint(m.Header.Get("Nats-Sequence"), 10, 64)
			out = append(out, rawMsg{subject: m.Header.Get("Nats-Subject"), seq: seq, header: m.Header, data: m.Data})
		}
	}
}

// directFirst reads the first message of stream matching filter, or nil
// when there is none.
func directFirst(ctx context.Context, nc *nats.Conn, stream, filter string) (*rawMsg, error) {
	req, _ := json.Marshal(struct {
		NextFor string `json:"next_by_subj"`
	}{filter})
	m, err := nc.RequestWithContext(ctx, "$JS.API.DIRECT.GET."+stream, req)
	if err != nil {
		return nil, err
	}
	switch m.Header.Get("Status") {
	case "":
	case "404":
		return nil, nil
	default:
		return nil, fmt.Errorf("direct get on %s: status %s %s", stream, m.Header.Get("Status"), m.Header.Get("Description"))
	}
	seq, _ := strconv.ParseUint(m.Header.Get("Nats-Sequence"), 10, 64)
	return &rawMsg{subject: m.Header.Get("Nats-Subject"), seq: seq, header: m.Header, data: m.Data}, nil
}

// apiRequest sends a JetStream API request and decodes its answer,
// turning an API error into an error.
func apiRequest(ctx context.Context, nc *nats.Conn, subject string, req, resp any) error {
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	m, err := nc.RequestWithContext(ctx, subject, b)
	if err != nil {
		return err
	}
	var e struct {
		Error *jetstream.APIError `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &e); err != nil {
		return fmt.Errorf("decoding %s answer: %w", subject, err)
	}
	if e.Error != nil {
		return e.Error
	}
	return json.Unmarshal(m.Data, resp)
}

// purge removes the messages of stream on filter, below sequence before
// when not 0, and returns how many it removed: the count nats.go's Purge
// does not return.
func purge(ctx context.Context, nc *nats.Conn, stream, filter string, before uint64) (int, error) {
	var resp struct {
		Purged uint64 `json:"purged"`
	}
	req := struct {
		Filter string `json:"filter"`
		Seq    uint64 `json:"seq,omitempty"`
	}{filter, before}
	if err := apiRequest(ctx, nc, "$JS.API.STREAM.PURGE."+stream, req, &resp); err != nil {
		return 0, fmt.Errorf("purging %s from %s: %w", filter, stream, err)
	}
	return int(resp.Purged), nil
}

// ackSync sends an acknowledgement of kind body (+ACK, -NAK {...}, +WPI,
// +TERM) and waits for the server's confirmation, which nats.go offers
// for +ACK alone (DoubleAck).
func ackSync(ctx context.Context, nc *nats.Conn, m jetstream.Msg, body string) error {
	if m.Reply() == "" {
		return errors.New("message cannot be acknowledged")
	}
	_, err := nc.RequestWithContext(ctx, m.Reply(), []byte(body))
	return err
}

func nakBody(delay time.Duration) string {
	if delay <= 0 {
		return "-NAK"
	}
	return fmt.Sprintf(`-NAK {"delay": %d}`, delay.Nanoseconds())
}
