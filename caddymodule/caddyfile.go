package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"
	"golang.org/x/net/http/httpguts"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/webhook-relay/caddy-webhook-relay/relay"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("webhook_relay", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("webhook_relay", httpcaddyfile.Before, "respond")
}

// stateNames is the adapter's record of relay names, to refuse two
// relays of the same name in one Caddyfile; stateStreams of NATS streams
// (stream -> relay name), to refuse two relays on one stream.
const (
	stateNames   = "webhook_relay.names"
	stateStreams = "webhook_relay.streams"
)

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	// Errors about the directive as a whole name its first line.
	h.Next()
	file, line := h.File(), h.Line()
	h.Reset()
	var handler Handler
	if err := handler.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	name := handler.Name
	if name == "" {
		name = relay.DefaultName
	}
	names, _ := h.State[stateNames].(map[string]bool)
	if names == nil {
		names = map[string]bool{}
		h.State[stateNames] = names
	}
	if names[name] {
		return nil, fmt.Errorf("two webhook_relay directives are named %q: give each its own name (webhook_relay <name> { ... }), at %s:%d", name, file, line)
	}
	names[name] = true
	if stream := storageStream(handler.StorageRaw, name); stream != "" {
		streams, _ := h.State[stateStreams].(map[string]string)
		if streams == nil {
			streams = map[string]string{}
			h.State[stateStreams] = streams
		}
		if other, dup := streams[stream]; dup {
			return nil, fmt.Errorf("webhook_relay %q and %q use the same NATS stream %s (the default is the relay name upper-cased, with every character outside A-Z and 0-9 as '_'): set 'stream <name>' in the storage nats block of one of them, at %s:%d", other, name, stream, file, line)
		}
		streams[stream] = name
	}
	return &handler, nil
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	webhook_relay [<name>] {
//		source okhi | generic
//		auth_header <field> <value> [<value>...]
//		auth off
//		max_body <size>
//		max_pending <n>
//		burst_hold <duration> | off
//		dedupe off
//		dedupe {
//			key <json_path> [<json_path>...]
//			capacity <n>
//			ttl <duration>
//			off
//		}
//		storage <dir> | memory
//		storage nats <url>[,<url>...] {
//			stream <name>
//			replicas <n>
//			creds <file> | token <value> | user <name> <password>
//			tls_ca <file>
//			tls_client <cert_file> <key_file>
//			connect_timeout <duration>
//			timeout <duration>
//		}
//		forward <target> <url> {
//			match <json_path> <value> [<value>...]
//			header <field> <value>
//			timeout <duration>
//			max_attempts <n>
//			backoff <min> <max>
//			max_age <duration>
//			concurrency <n>
//			method POST | PUT | PATCH
//			transform jq `<program>` | transform jq_file <path>
//			content_type <type>
//			body_format json | form
//			documented_only
//			order_by <json_path>
//			drop_stale <key_path> <time_path>
//			rate <n>/<s|m|h>
//			sign standard_webhooks <secret> [<secret>...]
//			tls {
//				ca <file>
//				client_cert <cert_file> <key_file>
//				server_name <name>
//			}
//		}
//	}
//
// auth_header values may be placeholders resolved at start: {env.X},
// {file./path}. Several values accept any of them (secret rotation).
// So may the credentials and TLS files of storage nats. A storage
// directory named memory or nats is written ./memory or ./nats.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	start := d.Line()
	var documentedAt []int // lines of forward blocks with documented_only
	if d.NextArg() {
		h.Name = d.Val()
		if err := checkName("relay", h.Name); err != nil {
			return d.Err(err.Error())
		}
		if d.NextArg() {
			return d.Errf("webhook_relay takes at most one argument, the relay's name: webhook_relay [<name>] { ... }")
		}
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "source":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			if v != string(relay.SourceOkHi) && v != string(relay.SourceGeneric) {
				return d.Errf("source must be okhi or generic, not %q", v)
			}
			h.Source = v
		case "auth_header":
			args := d.RemainingArgs()
			if len(args) < 2 {
				return d.Errf("auth_header needs a header field and at least one value: auth_header <field> <value> [<value>...]")
			}
			if h.Auth == nil {
				h.Auth = &Auth{}
			}
			if h.Auth.Header != "" {
				return d.Errf("auth_header is set twice; put every accepted value on one line")
			}
			if !httpguts.ValidHeaderFieldName(args[0]) {
				return d.Errf("auth_header field %q is not a valid HTTP header name", args[0])
			}
			h.Auth.Header = args[0]
			for i, v := range args[1:] {
				if strings.TrimSpace(v) == "" {
					return d.Errf("auth_header value %d is empty", i+1)
				}
			}
			h.Auth.Values = args[1:]
		case "auth":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			if v != "off" {
				return d.Errf("auth takes only 'off' (to set a header, use auth_header <field> <value>)")
			}
			if h.Auth == nil {
				h.Auth = &Auth{}
			}
			h.Auth.Off = true
		case "max_body":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			size, err := humanize.ParseBytes(v)
			if err != nil || size == 0 {
				return d.Errf("max_body: bad size %q (e.g. 1MiB, 512KB)", v)
			}
			h.MaxBody = int64(size)
		case "max_pending":
			n, err := positiveInt(d, "max_pending")
			if err != nil {
				return err
			}
			h.MaxPending = n
		case "burst_hold":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			if v == "off" {
				h.BurstHold = -1
				break
			}
			dur, err := parseDuration(d, "burst_hold", v)
			if err != nil {
				return err
			}
			h.BurstHold = dur
		case "dedupe":
			if err := h.unmarshalDedupe(d); err != nil {
				return err
			}
		case "storage":
			if h.StorageRaw != nil {
				return d.Errf("storage is set twice; keep one")
			}
			raw, err := unmarshalStorage(d)
			if err != nil {
				return err
			}
			h.StorageRaw = raw
		case "forward":
			line := d.Line()
			t, err := unmarshalTarget(d)
			if err != nil {
				return err
			}
			if t.DocumentedOnly {
				documentedAt = append(documentedAt, line)
			}
			for _, o := range h.Targets {
				if o.Name == t.Name {
					return d.Errf("two forward blocks are named %q: target names must be unique", t.Name)
				}
			}
			h.Targets = append(h.Targets, t)
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
	}
	if h.Source == string(relay.SourceGeneric) && len(documentedAt) > 0 {
		return blockErr(d, documentedAt[0], "documented_only needs source okhi: a generic body has no documented fields")
	}
	if h.Auth == nil || (h.Auth.Header == "" && !h.Auth.Off) {
		return blockErr(d, start, "webhook_relay needs 'auth_header <field> <value>' (or 'auth off' to accept unauthenticated requests)")
	}
	if h.Auth.Off && h.Auth.Header != "" {
		return blockErr(d, start, "webhook_relay has both 'auth off' and 'auth_header': keep one")
	}
	if len(h.Targets) == 0 {
		return blockErr(d, start, "webhook_relay needs at least one 'forward <target> <url>' block")
	}
	return nil
}

// blockErr reports a problem of the whole webhook_relay block at the line
// where the block starts (d.Errf would name the closing brace's line).
func blockErr(d *caddyfile.Dispenser, line int, msg string) error {
	return fmt.Errorf("%s, at %s:%d", msg, d.File(), line)
}

func (h *Handler) unmarshalDedupe(d *caddyfile.Dispenser) error {
	if h.Dedupe == nil {
		h.Dedupe = &Dedupe{}
	}
	if d.NextArg() {
		if d.Val() != "off" {
			return d.Errf("dedupe takes 'off' or a block, not %q", d.Val())
		}
		h.Dedupe.Off = true
		if d.NextArg() {
			return d.Errf("dedupe off takes no more arguments, got %q", d.Val())
		}
		return nil
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "key":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.Errf("key needs at least one JSON path")
			}
			h.Dedupe.Keys = append(h.Dedupe.Keys, args...)
		case "capacity":
			n, err := positiveInt(d, "capacity")
			if err != nil {
				return err
			}
			h.Dedupe.Capacity = n
		case "ttl":
			v, err := duration(d, "ttl")
			if err != nil {
				return err
			}
			h.Dedupe.TTL = v
		case "off":
			if d.NextArg() {
				return d.Errf("off takes no arguments, got %q", d.Val())
			}
			h.Dedupe.Off = true
		default:
			return d.Errf("unrecognized dedupe subdirective %q", d.Val())
		}
	}
	return nil
}

func unmarshalTarget(d *caddyfile.Dispenser) (Target, error) {
	var t Target
	args := d.RemainingArgs()
	if len(args) != 2 {
		return t, d.Errf("forward needs a target name and a URL: forward <target> <url> { ... }")
	}
	t.Name, t.URL = args[0], args[1]
	if err := checkName("target", t.Name); err != nil {
		return t, d.Errf("forward: %v", err)
	}
	if err := relay.CheckURL(t.URL); err != nil {
		return t, d.Errf("forward %s: %v", t.Name, err)
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "match":
			args := d.RemainingArgs()
			if len(args) < 2 {
				return t, d.Errf("match needs a JSON path and at least one value: match <json_path> <value> [<value>...]")
			}
			if strings.TrimSpace(args[0]) == "" {
				return t, d.Errf("match needs a non-empty JSON path")
			}
			t.Match = append(t.Match, Match{Path: args[0], Values: args[1:]})
		case "header":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return t, d.Errf("header needs a field and a value: header <field> <value>")
			}
			if strings.EqualFold(args[0], "Host") {
				return t, d.Errf("header Host cannot be set on forwarded requests")
			}
			if !httpguts.ValidHeaderFieldName(args[0]) {
				return t, d.Errf("header field %q is not a valid HTTP header name", args[0])
			}
			if !httpguts.ValidHeaderFieldValue(args[1]) {
				return t, d.Errf("header %s: the value has characters an HTTP header cannot carry (newline, control characters)", args[0])
			}
			if t.Headers == nil {
				t.Headers = http.Header{}
			}
			t.Headers.Add(args[0], args[1])
		case "timeout":
			v, err := duration(d, "timeout")
			if err != nil {
				return t, err
			}
			t.Timeout = v
		case "max_attempts":
			n, err := positiveInt(d, "max_attempts")
			if err != nil {
				return t, err
			}
			t.MaxAttempts = n
		case "backoff":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return t, d.Errf("backoff needs a minimum and a maximum: backoff <min> <max>")
			}
			lo, err := parseDuration(d, "backoff min", args[0])
			if err != nil {
				return t, err
			}
			hi, err := parseDuration(d, "backoff max", args[1])
			if err != nil {
				return t, err
			}
			if hi < lo {
				return t, d.Errf("backoff max %s is below min %s", args[1], args[0])
			}
			t.BackoffMin, t.BackoffMax = lo, hi
		case "max_age":
			v, err := duration(d, "max_age")
			if err != nil {
				return t, err
			}
			t.MaxAge = v
		case "concurrency":
			n, err := positiveInt(d, "concurrency")
			if err != nil {
				return t, err
			}
			t.Concurrency = n
		default:
			known, err := unmarshalShaping(d, &t.Shaping, t.URL)
			if err != nil {
				return t, err
			}
			if !known {
				return t, d.Errf("unrecognized forward subdirective %q", d.Val())
			}
		}
	}
	return t, nil
}

// unmarshalStorage parses the storage subdirective into its module's
// JSON: `storage <dir>` (bolt), `storage memory` or `storage nats ...`.
func unmarshalStorage(d *caddyfile.Dispenser) (json.RawMessage, error) {
	if !d.NextArg() {
		return nil, d.Errf("storage needs one argument: storage <dir> | memory | nats <url>[,<url>...] { ... }")
	}
	var (
		mod     any
		backend string
	)
	arg := d.Val()
	switch arg {
	case "nats":
		n := new(NATSStorage)
		if err := n.UnmarshalCaddyfile(d.NewFromNextSegment()); err != nil {
			return nil, err
		}
		return caddyconfig.JSONModuleObject(n, "backend", "nats", nil), nil
	case StorageMemory:
		mod, backend = MemoryStorage{}, "memory"
	default:
		mod, backend = BoltStorage{Dir: arg}, "bolt"
	}
	if d.NextArg() {
		return nil, d.Errf("storage takes one argument (a directory, or memory), got more: %q", d.Val())
	}
	if d.NextBlock(d.Nesting()) {
		return nil, d.Errf("storage %s takes no block (only storage nats has one)", arg)
	}
	return caddyconfig.JSONModuleObject(mod, "backend", backend, nil), nil
}

// UnmarshalCaddyfile sets up the NATS storage from the tokens of the
// storage subdirective, from `nats` on. Syntax:
//
//	nats <url>[,<url>...] {
//		stream <name>
//		replicas <n>
//		creds <file> | token <value> | user <name> <password>
//		tls_ca <file>
//		tls_client <cert_file> <key_file>
//		connect_timeout <duration>
//		timeout <duration>
//	}
//
// Several URLs may also be given as several arguments.
func (n *NATSStorage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // nats
	for _, arg := range d.RemainingArgs() {
		for u := range strings.SplitSeq(arg, ",") {
			u = strings.TrimSpace(u)
			if u == "" {
				return d.Errf("storage nats: an empty URL between commas")
			}
			if err := checkNATSURL(u); err != nil {
				return d.Errf("storage nats: %v", err)
			}
			n.URLs = append(n.URLs, u)
		}
	}
	if len(n.URLs) == 0 {
		return d.Errf("storage nats needs at least one URL: storage nats nats://<host>:4222[,nats://<host>:4222...] (for a directory named nats, write ./nats)")
	}
	seen := map[string]bool{}
	credentials := ""
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("storage nats: %s is set twice; keep one", sub)
		}
		seen[sub] = true
		switch sub {
		case "creds", "token", "user":
			if credentials != "" {
				return d.Errf("storage nats takes one kind of credentials (creds, token or user), not both %s and %s", credentials, sub)
			}
			credentials = sub
		}
		switch sub {
		case "stream":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			if err := checkStreamName(v); err != nil {
				return d.Errf("storage nats: %v", err)
			}
			n.Stream = v
		case "replicas":
			r, err := positiveInt(d, "replicas")
			if err != nil {
				return err
			}
			if r > maxReplicas {
				return d.Errf("replicas must be 1 to %d (JetStream's limit), not %d", maxReplicas, r)
			}
			n.Replicas = r
		case "creds":
			v, err := nonEmptyArg(d)
			if err != nil {
				return err
			}
			n.Creds = v
		case "token":
			v, err := nonEmptyArg(d)
			if err != nil {
				return err
			}
			n.Token = v
		case "user":
			args := d.RemainingArgs()
			if len(args) != 2 || args[0] == "" || args[1] == "" {
				return d.Errf("user needs a name and a password: user <name> <password>")
			}
			n.User, n.Password = args[0], args[1]
		case "tls_ca":
			v, err := nonEmptyArg(d)
			if err != nil {
				return err
			}
			n.TLSCA = v
		case "tls_client":
			args := d.RemainingArgs()
			if len(args) != 2 || args[0] == "" || args[1] == "" {
				return d.Errf("tls_client needs a certificate file and a key file: tls_client <cert_file> <key_file>")
			}
			n.TLSClientCert, n.TLSClientKey = args[0], args[1]
		case "connect_timeout":
			v, err := duration(d, "connect_timeout")
			if err != nil {
				return err
			}
			n.ConnectTimeout = v
		case "timeout":
			v, err := duration(d, "timeout")
			if err != nil {
				return err
			}
			n.Timeout = v
		default:
			return d.Errf("unrecognized storage nats subdirective %q", sub)
		}
	}
	return nil
}

// nonEmptyArg is oneArg for values that cannot be empty. The message
// never shows the value (it may be a secret).
func nonEmptyArg(d *caddyfile.Dispenser) (string, error) {
	name := d.Val()
	v, err := oneArg(d)
	if err != nil {
		return "", err
	}
	if strings.TrimSpace(v) == "" {
		return "", d.Errf("%s is empty", name)
	}
	return v, nil
}

// oneArg returns the single argument of the current subdirective.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	name := d.Val()
	if !d.NextArg() {
		return "", d.Errf("%s needs one argument", name)
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.Errf("%s takes one argument, got more: %q", name, d.Val())
	}
	return v, nil
}

func positiveInt(d *caddyfile.Dispenser, what string) (int, error) {
	v, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, d.Errf("%s must be a positive whole number, not %q", what, v)
	}
	return n, nil
}

func duration(d *caddyfile.Dispenser, what string) (caddy.Duration, error) {
	v, err := oneArg(d)
	if err != nil {
		return 0, err
	}
	return parseDuration(d, what, v)
}

func parseDuration(d *caddyfile.Dispenser, what, v string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(v)
	if err != nil || dur <= 0 {
		return 0, d.Errf("%s: bad duration %q (e.g. 500ms, 10s, 5m, 72h, 3d)", what, v)
	}
	return caddy.Duration(dur), nil
}

// Interface guards.
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*NATSStorage)(nil)
)
