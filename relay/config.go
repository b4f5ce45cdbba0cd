package relay

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"
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
	Dedupe     DedupeConfig
	Targets    []TargetConfig
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
		targets[i] = t
	}
	c.Targets = targets
	return c, nil
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
