package relay

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/webhook-relay/caddy-webhook-relay/relay/shape"
)

// Source names a payload profile: which dedupe key to use by default, and
// whether bodies must be JSON.
type Source string

const (
	// SourceOkHi: JSON bodies; key event_id (v3), else the v2 triple.
	SourceOkHi Source = "okhi"
	// SourceGeneric: any bytes; key is the hash of the body unless set.
	SourceGeneric Source = "generic"
)

// Defaults of the contract.
const (
	DefaultMaxBody       = 1 << 20
	DefaultMaxPending    = 1_000_000
	DefaultCapacity      = 100_000
	DefaultTTL           = 72 * time.Hour
	DefaultTimeout       = 10 * time.Second
	DefaultMaxAttempts   = 25
	DefaultBackoffMin    = time.Second
	DefaultBackoffMax    = 10 * time.Minute
	DefaultMaxAge        = 72 * time.Hour
	DefaultConcurrency   = 8
	DefaultRetryAfter    = 5 * time.Second
	DefaultName          = "default"
	ReasonTargetRemoved  = "target removed from config"
	ReasonMaxAgeExceeded = "max age exceeded"
)

// Config is one relay's settings. Zero values take the defaults above.
type Config struct {
	Name       string
	Source     Source
	MaxBody    int64
	MaxPending int
	// RetryAfter is what a 503 tells the sender to wait.
	RetryAfter time.Duration
	// BurstHold is the longest a burst may hold deliveries back so that
	// acks get the CPU (burst.go); zero is DefaultBurstHold, below zero
	// turns holds off.
	BurstHold time.Duration
	Dedupe    DedupeConfig
	Targets   []TargetConfig
}

// DedupeConfig says how re-deliveries are recognised.
type DedupeConfig struct {
	// Keys are gjson paths whose values make the dedupe key.
	Keys     []string
	Capacity int
	TTL      time.Duration
	Off      bool
}

// TargetConfig is one internal endpoint.
type TargetConfig struct {
	Name string
	URL  string
	// Match: every entry must hold (AND); an entry holds when the value at
	// Path is one of Values (OR).
	Match       []Match
	Headers     http.Header
	Timeout     time.Duration
	MaxAttempts int
	BackoffMin  time.Duration
	BackoffMax  time.Duration
	MaxAge      time.Duration
	Concurrency int

	// What the target receives (see package shape).

	// Method of forwarded requests: POST, PUT or PATCH. Default POST.
	Method string
	// DocumentedOnly forwards only the fields OkHi documents (source okhi).
	DocumentedOnly bool
	// Transform is a jq program whose single output becomes the body; ""
	// forwards the body as received. TransformName names it in errors
	// (its file, or "transform").
	Transform     string
	TransformName string
	// ContentType is sent with a transform's string output, as raw bytes.
	ContentType string
	// BodyFormat is json (default) or form.
	BodyFormat BodyFormat
	// Sign holds Standard Webhooks secrets (whsec_...): one signature per
	// secret on every request.
	Sign []string
	// TLS is how https targets are trusted and how the relay proves who it
	// is; nil is the system's roots.
	TLS *TLSConfig

	// When the target receives it.

	// OrderBy is a gjson path: deliveries of events with the same value go
	// one at a time, in the order the events were accepted.
	OrderBy string
	// DropStale, when set, skips an event older than one already
	// delivered to the target for the same key.
	DropStale *DropStale
	// Rate caps the requests to the target, relay-wide; zero is no cap.
	Rate Rate
}

// BodyFormat is how a target's body is encoded.
type BodyFormat string

const (
	BodyJSON BodyFormat = "json"
	BodyForm BodyFormat = "form"
)

// DropStale says where an event's key and time are.
type DropStale struct {
	KeyPath  string
	TimePath string
}

// Rate is at most N requests per Per, spread evenly (burst 1).
type Rate struct {
	N   int
	Per time.Duration
}

// Interval is the spacing between two requests; zero for no rate.
func (r Rate) Interval() time.Duration {
	if r.N <= 0 || r.Per <= 0 {
		return 0
	}
	return r.Per / time.Duration(r.N)
}

// TLSConfig holds the PEM contents of the files a target's TLS names
// (read when the config loads, so that a renewed certificate is a change),
// and the files' names for messages.
type TLSConfig struct {
	CA         []byte
	CAFile     string
	Cert, Key  []byte
	CertFile   string
	KeyFile    string
	ServerName string
}

// Match is one filter line.
type Match struct {
	Path   string
	Values []string
}

// ErrConfig wraps every configuration error.
var ErrConfig = errors.New("invalid relay config")

// WithDefaults returns c with defaults filled in, and checks it.
func (c Config) WithDefaults() (Config, error) {
	if c.Name == "" {
		c.Name = DefaultName
	}
	switch c.Source {
	case "":
		c.Source = SourceOkHi
	case SourceOkHi, SourceGeneric:
	default:
		return c, fmt.Errorf("%w: unknown source %q (want okhi or generic)", ErrConfig, c.Source)
	}
	if c.MaxBody <= 0 {
		c.MaxBody = DefaultMaxBody
	}
	if c.MaxPending <= 0 {
		c.MaxPending = DefaultMaxPending
	}
	if c.RetryAfter <= 0 {
		c.RetryAfter = DefaultRetryAfter
	}
	if c.BurstHold == 0 {
		c.BurstHold = DefaultBurstHold
	}
	if c.Dedupe.Capacity <= 0 {
		c.Dedupe.Capacity = DefaultCapacity
	}
	if c.Dedupe.TTL <= 0 {
		c.Dedupe.TTL = DefaultTTL
	}
	if len(c.Targets) == 0 {
		return c, fmt.Errorf("%w: at least one target is required", ErrConfig)
	}
	seen := map[string]bool{}
	targets := make([]TargetConfig, len(c.Targets))
	for i, t := range c.Targets {
		if t.Name == "" {
			return c, fmt.Errorf("%w: target %d has no name", ErrConfig, i)
		}
		if seen[t.Name] {
			return c, fmt.Errorf("%w: two targets named %q", ErrConfig, t.Name)
		}
		seen[t.Name] = true
		if err := CheckURL(t.URL); err != nil {
			return c, fmt.Errorf("%w: target %q: %v", ErrConfig, t.Name, err)
		}
		if t.Timeout <= 0 {
			t.Timeout = DefaultTimeout
		}
		if t.MaxAttempts <= 0 {
			t.MaxAttempts = DefaultMaxAttempts
		}
		if t.BackoffMin <= 0 {
			t.BackoffMin = DefaultBackoffMin
		}
		if t.BackoffMax <= 0 {
			t.BackoffMax = DefaultBackoffMax
		}
		if t.BackoffMax < t.BackoffMin {
			return c, fmt.Errorf("%w: target %q: backoff max %s is below min %s", ErrConfig, t.Name, t.BackoffMax, t.BackoffMin)
		}
		if t.MaxAge <= 0 {
			t.MaxAge = DefaultMaxAge
		}
		if t.Concurrency <= 0 {
			t.Concurrency = DefaultConcurrency
		}
		for _, m := range t.Match {
			if m.Path == "" || len(m.Values) == 0 {
				return c, fmt.Errorf("%w: target %q: match needs a path and at least one value", ErrConfig, t.Name)
			}
		}
		if err := t.checkShape(c.Source); err != nil {
			return c, fmt.Errorf("%w: target %q: %v", ErrConfig, t.Name, err)
		}
		targets[i] = t
	}
	c.Targets = targets
	return c, nil
}

// checkShape checks the settings of what and when the target receives,
// and fills in their defaults. A transform is compiled by the engine,
// once per config load.
func (t *TargetConfig) checkShape(src Source) error {
	switch t.Method {
	case "":
		t.Method = http.MethodPost
	case http.MethodPost, http.MethodPut, http.MethodPatch:
	default:
		return fmt.Errorf("method %q: want POST, PUT or PATCH", t.Method)
	}
	switch t.BodyFormat {
	case "":
		t.BodyFormat = BodyJSON
	case BodyJSON, BodyForm:
	default:
		return fmt.Errorf("body_format %q: want json or form", t.BodyFormat)
	}
	if t.DocumentedOnly && src == SourceGeneric {
		return errors.New("documented_only needs source okhi: a generic body has no documented fields")
	}
	if t.ContentType != "" && t.Transform == "" {
		return errors.New("content_type is for a transform whose output is a string: add a transform")
	}
	if t.ContentType != "" && t.BodyFormat == BodyForm {
		return errors.New("content_type and body_format form cannot both be set: a form body is application/x-www-form-urlencoded")
	}
	if t.Transform != "" && t.TransformName == "" {
		t.TransformName = "transform"
	}
	if t.DropStale != nil && (t.DropStale.KeyPath == "" || t.DropStale.TimePath == "") {
		return errors.New("drop_stale needs a key path and a time path")
	}
	if (t.Rate.N != 0 || t.Rate.Per != 0) && t.Rate.Interval() <= 0 {
		return fmt.Errorf("rate %d per %s: want a positive number of requests per positive unit", t.Rate.N, t.Rate.Per)
	}
	for _, s := range t.Sign {
		if _, err := shape.DecodeSecret(s); err != nil {
			return err
		}
	}
	if t.TLS != nil && !strings.HasPrefix(strings.ToLower(t.URL), "https://") {
		return fmt.Errorf("tls is for https targets, and %s is not one", t.URL)
	}
	if _, err := clientTLS(t.TLS); err != nil {
		return err
	}
	return nil
}

// CheckURL accepts absolute http and https URLs with a host.
func CheckURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("bad URL %q: %v", s, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("bad URL %q: scheme must be http or https", s)
	}
	if u.Host == "" {
		return fmt.Errorf("bad URL %q: no host", s)
	}
	return nil
}
