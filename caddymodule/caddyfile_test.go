package caddymodule

import (
	"encoding/json"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func dur(d time.Duration) caddy.Duration { return caddy.Duration(d) }

// minimal is the smallest valid block body; cases add the line under test.
const minimal = `
	auth_header X-Secret s3cret
	forward t1 http://127.0.0.1:9000/hook
`

var minimalTarget = Target{Name: "t1", URL: "http://127.0.0.1:9000/hook"}

func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  Handler
	}{
		{
			name:  "minimal",
			input: "webhook_relay {" + minimal + "}",
			want: Handler{
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name:  "name",
			input: "webhook_relay okhi {" + minimal + "}",
			want: Handler{
				Name:    "okhi",
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "source generic",
			input: `webhook_relay {
				source generic` + minimal + "}",
			want: Handler{
				Source:  "generic",
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "source okhi",
			input: `webhook_relay {
				source okhi` + minimal + "}",
			want: Handler{
				Source:  "okhi",
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "auth_header with several values and placeholders",
			input: `webhook_relay {
				auth_header okhi-authorization {env.OKHI_NEW} {file./run/secrets/okhi} old-secret
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: Handler{
				Auth: &Auth{
					Header: "okhi-authorization",
					Values: []string{"{env.OKHI_NEW}", "{file./run/secrets/okhi}", "old-secret"},
				},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "auth off",
			input: `webhook_relay {
				auth off
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: Handler{
				Auth:    &Auth{Off: true},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "max_body in MiB",
			input: `webhook_relay {
				max_body 1MiB` + minimal + "}",
			want: Handler{
				MaxBody: 1 << 20,
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "max_body in KB",
			input: `webhook_relay {
				max_body 512KB` + minimal + "}",
			want: Handler{
				MaxBody: 512_000,
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "max_pending",
			input: `webhook_relay {
				max_pending 5000` + minimal + "}",
			want: Handler{
				MaxPending: 5000,
				Auth:       &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:    []Target{minimalTarget},
			},
		},
		{
			name: "burst_hold",
			input: `webhook_relay {
				burst_hold 30s` + minimal + "}",
			want: Handler{
				BurstHold: caddy.Duration(30 * time.Second),
				Auth:      &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:   []Target{minimalTarget},
			},
		},
		{
			name: "burst_hold off",
			input: `webhook_relay {
				burst_hold off` + minimal + "}",
			want: Handler{
				BurstHold: -1,
				Auth:      &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:   []Target{minimalTarget},
			},
		},
		{
			name: "dedupe block",
			input: `webhook_relay {
				dedupe {
					key v2.address_verification_id v2.verification_status
					key v2.verification_mode
					capacity 5000
					ttl 3d
				}` + minimal + "}",
			want: Handler{
				Dedupe: &Dedupe{
					Keys:     []string{"v2.address_verification_id", "v2.verification_status", "v2.verification_mode"},
					Capacity: 5000,
					TTL:      dur(72 * time.Hour),
				},
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "dedupe block with off",
			input: `webhook_relay {
				dedupe {
					off
				}` + minimal + "}",
			want: Handler{
				Dedupe:  &Dedupe{Off: true},
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "dedupe off",
			input: `webhook_relay {
				dedupe off` + minimal + "}",
			want: Handler{
				Dedupe:  &Dedupe{Off: true},
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "storage dir",
			input: `webhook_relay {
				storage /var/lib/relay` + minimal + "}",
			want: Handler{
				StorageRaw: json.RawMessage(`{"backend":"bolt","dir":"/var/lib/relay"}`),
				Auth:       &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:    []Target{minimalTarget},
			},
		},
		{
			name: "storage in a directory named nats",
			input: `webhook_relay {
				storage ./nats` + minimal + "}",
			want: Handler{
				StorageRaw: json.RawMessage(`{"backend":"bolt","dir":"./nats"}`),
				Auth:       &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:    []Target{minimalTarget},
			},
		},
		{
			name: "storage memory",
			input: `webhook_relay {
				storage memory` + minimal + "}",
			want: Handler{
				StorageRaw: json.RawMessage(`{"backend":"memory"}`),
				Auth:       &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:    []Target{minimalTarget},
			},
		},
		{
			name: "storage nats with one URL",
			input: `webhook_relay {
				storage nats nats://127.0.0.1:4222` + minimal + "}",
			want: Handler{
				StorageRaw: json.RawMessage(`{"backend":"nats","urls":["nats://127.0.0.1:4222"]}`),
				Auth:       &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:    []Target{minimalTarget},
			},
		},
		{
			name: "storage nats with URLs in a list and as arguments",
			input: `webhook_relay {
				storage nats nats://n1:4222,tls://n2:4222 wss://n3/ws` + minimal + "}",
			want: Handler{
				StorageRaw: json.RawMessage(`{"backend":"nats","urls":["nats://n1:4222","tls://n2:4222","wss://n3/ws"]}`),
				Auth:       &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:    []Target{minimalTarget},
			},
		},
		{
			name: "storage nats with every option and a token",
			input: `webhook_relay {
				storage nats nats://n1:4222,nats://n2:4222 {
					stream OKHI
					replicas 3
					token {env.NATS_TOKEN}
					tls_ca /etc/nats/ca.pem
					tls_client /etc/nats/client.pem /etc/nats/client-key.pem
					connect_timeout 3s
					timeout 1500ms
				}` + minimal + "}",
			want: Handler{
				StorageRaw: json.RawMessage(`{"backend":"nats","connect_timeout":3000000000,"replicas":3,"stream":"OKHI",` +
					`"timeout":1500000000,"tls_ca":"/etc/nats/ca.pem","tls_client_cert":"/etc/nats/client.pem",` +
					`"tls_client_key":"/etc/nats/client-key.pem","token":"{env.NATS_TOKEN}","urls":["nats://n1:4222","nats://n2:4222"]}`),
				Auth:    &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{minimalTarget},
			},
		},
		{
			name: "storage nats with a user",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					user relay {file./run/secrets/nats_password}
				}` + minimal + "}",
			want: Handler{
				StorageRaw: json.RawMessage(`{"backend":"nats","password":"{file./run/secrets/nats_password}","urls":["nats://n1:4222"],"user":"relay"}`),
				Auth:       &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:    []Target{minimalTarget},
			},
		},
		{
			name: "storage nats with a creds file",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					creds /etc/nats/relay.creds
				}` + minimal + "}",
			want: Handler{
				StorageRaw: json.RawMessage(`{"backend":"nats","creds":"/etc/nats/relay.creds","urls":["nats://n1:4222"]}`),
				Auth:       &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets:    []Target{minimalTarget},
			},
		},
		{
			name: "forward with every option",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward crm https://crm.internal/okhi {
					match v2.verification_status verified not_at_address
					match v2.verification_mode first_time
					header Authorization "Bearer {env.CRM_TOKEN}"
					header X-Source okhi
					timeout 5s
					max_attempts 10
					backoff 500ms 2m
					max_age 24h
					concurrency 4
				}
			}`,
			want: Handler{
				Auth: &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{{
					Name: "crm",
					URL:  "https://crm.internal/okhi",
					Match: []Match{
						{Path: "v2.verification_status", Values: []string{"verified", "not_at_address"}},
						{Path: "v2.verification_mode", Values: []string{"first_time"}},
					},
					Headers:     http.Header{"Authorization": {"Bearer {env.CRM_TOKEN}"}, "X-Source": {"okhi"}},
					Timeout:     dur(5 * time.Second),
					MaxAttempts: 10,
					BackoffMin:  dur(500 * time.Millisecond),
					BackoffMax:  dur(2 * time.Minute),
					MaxAge:      dur(24 * time.Hour),
					Concurrency: 4,
				}},
			},
		},
		{
			name: "two forwards",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward verified http://127.0.0.1:9001/v {
					match v2.verification_status verified
				}
				forward everything http://127.0.0.1:9002/all
			}`,
			want: Handler{
				Auth: &Auth{Header: "X-Secret", Values: []string{"s3cret"}},
				Targets: []Target{
					{
						Name:  "verified",
						URL:   "http://127.0.0.1:9001/v",
						Match: []Match{{Path: "v2.verification_status", Values: []string{"verified"}}},
					},
					{Name: "everything", URL: "http://127.0.0.1:9002/all"},
				},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got Handler
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input)); err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got\n%s\nwant\n%s", toJSON(t, got), toJSON(t, tt.want))
			}
		})
	}
}

func toJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatalf("marshaling %T: %v", v, err)
	}
	return string(b)
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	tests := []struct {
		name  string
		input string
		// want are substrings of the error: the sentence and the file:line.
		want []string
	}{
		{
			name: "unknown subdirective",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				retries 5
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{`unrecognized subdirective "retries"`, "Testfile:3"},
		},
		{
			name: "unknown dedupe subdirective",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				dedupe {
					window 1h
				}
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{`unrecognized dedupe subdirective "window"`, "Testfile:4"},
		},
		{
			name: "unknown forward subdirective",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					retry_on 500
				}
			}`,
			want: []string{`unrecognized forward subdirective "retry_on"`, "Testfile:4"},
		},
		{
			name: "missing auth_header",
			input: `webhook_relay {
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{"needs 'auth_header <field> <value>'", "auth off", "Testfile:1"},
		},
		{
			name: "auth off and auth_header",
			input: `
			webhook_relay {
				auth off
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{"both 'auth off' and 'auth_header'", "Testfile:2"},
		},
		{
			name: "auth other than off",
			input: `webhook_relay {
				auth on
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{"auth takes only 'off'", "Testfile:2"},
		},
		{
			name: "no forward",
			input: `webhook_relay {
				auth_header X-Secret s3cret
			}`,
			want: []string{"needs at least one 'forward <target> <url>' block", "Testfile:1"},
		},
		{
			name:  "no block at all",
			input: `webhook_relay`,
			want:  []string{"needs 'auth_header <field> <value>'", "Testfile:1"},
		},
		{
			name: "URL without scheme",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 crm.internal/hook
			}`,
			want: []string{"forward t1", "bad URL", "scheme must be http or https", "Testfile:3"},
		},
		{
			name: "URL with ftp scheme",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 ftp://crm.internal/hook
			}`,
			want: []string{"forward t1", "scheme must be http or https", "Testfile:3"},
		},
		{
			name: "URL without host",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http:///hook
			}`,
			want: []string{"forward t1", "no host", "Testfile:3"},
		},
		{
			name: "bad size",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				max_body lots
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{`max_body: bad size "lots"`, "Testfile:3"},
		},
		{
			name: "zero size",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				max_body 0
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{`max_body: bad size "0"`, "Testfile:3"},
		},
		{
			name: "bad duration",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					timeout soon
				}
			}`,
			want: []string{`timeout: bad duration "soon"`, "Testfile:4"},
		},
		{
			name: "negative duration",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					max_age -1h
				}
			}`,
			want: []string{`max_age: bad duration "-1h"`, "Testfile:4"},
		},
		{
			name: "zero ttl",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				dedupe {
					ttl 0s
				}
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{`ttl: bad duration "0s"`, "Testfile:4"},
		},
		{
			name: "bad backoff duration",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					backoff 1s forever
				}
			}`,
			want: []string{`backoff max: bad duration "forever"`, "Testfile:4"},
		},
		{
			name: "bad burst_hold",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				burst_hold soon
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{`burst_hold: bad duration "soon"`, "Testfile:3"},
		},
		{
			name: "negative max_pending",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				max_pending -1
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{`max_pending must be a positive whole number, not "-1"`, "Testfile:3"},
		},
		{
			name: "zero capacity",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				dedupe {
					capacity 0
				}
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{`capacity must be a positive whole number, not "0"`, "Testfile:4"},
		},
		{
			name: "zero max_attempts",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					max_attempts 0
				}
			}`,
			want: []string{`max_attempts must be a positive whole number, not "0"`, "Testfile:4"},
		},
		{
			name: "fractional concurrency",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					concurrency 1.5
				}
			}`,
			want: []string{`concurrency must be a positive whole number, not "1.5"`, "Testfile:4"},
		},
		{
			name: "two targets with the same name",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward crm http://127.0.0.1:9000/a
				forward crm http://127.0.0.1:9000/b
			}`,
			want: []string{`two forward blocks are named "crm"`, "Testfile:4"},
		},
		{
			name: "empty auth_header value",
			input: `webhook_relay {
				auth_header X-Secret new ""
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{"auth_header value 2 is empty", "Testfile:2"},
		},
		{
			name: "auth_header without value",
			input: `webhook_relay {
				auth_header X-Secret
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{"auth_header needs a header field and at least one value", "Testfile:2"},
		},
		{
			name: "auth_header twice",
			input: `webhook_relay {
				auth_header X-Secret a
				auth_header X-Secret b
				forward t1 http://127.0.0.1:9000/hook
			}`,
			want: []string{"auth_header is set twice", "Testfile:3"},
		},
		{
			name: "backoff max below min",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					backoff 1m 10s
				}
			}`,
			want: []string{"backoff max 10s is below min 1m", "Testfile:4"},
		},
		{
			name: "backoff with one argument",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					backoff 1s
				}
			}`,
			want: []string{"backoff needs a minimum and a maximum", "Testfile:4"},
		},
		{
			name:  "two names",
			input: `webhook_relay a b {` + minimal + `}`,
			want:  []string{"webhook_relay takes at most one argument, the relay's name", "Testfile:1"},
		},
		{
			name:  "relay name with a slash",
			input: `webhook_relay okhi/prod {` + minimal + `}`,
			want:  []string{`relay name "okhi/prod": use up to 64 letters, digits`, "Testfile:1"},
		},
		{
			name: "target name with a space",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward "crm api" http://127.0.0.1:9000/hook
			}`,
			want: []string{`forward: target name "crm api": use up to 64 letters, digits`, "Testfile:3"},
		},
		{
			name: "unknown source",
			input: `webhook_relay {
				source stripe` + minimal + `}`,
			want: []string{`source must be okhi or generic, not "stripe"`, "Testfile:2"},
		},
		{
			name: "source with two arguments",
			input: `webhook_relay {
				source okhi generic` + minimal + `}`,
			want: []string{`source takes one argument, got more: "generic"`, "Testfile:2"},
		},
		{
			name: "storage without argument",
			input: `webhook_relay {
				storage` + minimal + `}`,
			want: []string{"storage needs one argument", "Testfile:2"},
		},
		{
			name: "storage twice",
			input: `webhook_relay {
				storage /var/lib/a
				storage memory` + minimal + `}`,
			want: []string{"storage is set twice", "Testfile:3"},
		},
		{
			name: "storage with two directories",
			input: `webhook_relay {
				storage /var/lib/a /var/lib/b` + minimal + `}`,
			want: []string{`storage takes one argument (a directory, or memory), got more: "/var/lib/b"`, "Testfile:2"},
		},
		{
			name: "storage memory with a block",
			input: `webhook_relay {
				storage memory {
					replicas 3
				}` + minimal + `}`,
			want: []string{"storage memory takes no block (only storage nats has one)", "Testfile:3"},
		},
		{
			name: "storage nats without URL",
			input: `webhook_relay {
				storage nats` + minimal + `}`,
			want: []string{"storage nats needs at least one URL", "write ./nats", "Testfile:2"},
		},
		{
			name: "storage nats without URL, with a block",
			input: `webhook_relay {
				storage nats {
					stream OKHI
				}` + minimal + `}`,
			want: []string{"storage nats needs at least one URL", "Testfile:2"},
		},
		{
			name: "storage nats with an http URL",
			input: `webhook_relay {
				storage nats http://127.0.0.1:4222` + minimal + `}`,
			want: []string{"bad NATS URL http://127.0.0.1:4222: the scheme must be nats, tls, ws or wss", "Testfile:2"},
		},
		{
			name: "storage nats with a URL without scheme",
			input: `webhook_relay {
				storage nats 127.0.0.1:4222` + minimal + `}`,
			want: []string{"bad NATS URL: it needs a scheme: nats://, tls://, ws:// or wss://", "Testfile:2"},
		},
		{
			name: "storage nats with a URL without host",
			input: `webhook_relay {
				storage nats nats://:4222` + minimal + `}`,
			want: []string{"bad NATS URL nats://:4222: no host", "Testfile:2"},
		},
		{
			name: "storage nats with a bad port",
			input: `webhook_relay {
				storage nats nats://n1:99999` + minimal + `}`,
			want: []string{"bad NATS URL nats://n1:99999: bad port", "Testfile:2"},
		},
		{
			name: "storage nats with an empty URL in the list",
			input: `webhook_relay {
				storage nats nats://n1:4222,,nats://n2:4222` + minimal + `}`,
			want: []string{"storage nats: an empty URL between commas", "Testfile:2"},
		},
		{
			name: "storage nats unknown subdirective",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					cluster c1
				}` + minimal + `}`,
			want: []string{`unrecognized storage nats subdirective "cluster"`, "Testfile:3"},
		},
		{
			name: "storage nats bad timeout",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					timeout quick
				}` + minimal + `}`,
			want: []string{`timeout: bad duration "quick"`, "Testfile:3"},
		},
		{
			name: "storage nats bad connect_timeout",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					connect_timeout 0s
				}` + minimal + `}`,
			want: []string{`connect_timeout: bad duration "0s"`, "Testfile:3"},
		},
		{
			name: "storage nats replicas not a number",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					replicas three
				}` + minimal + `}`,
			want: []string{`replicas must be a positive whole number, not "three"`, "Testfile:3"},
		},
		{
			name: "storage nats zero replicas",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					replicas 0
				}` + minimal + `}`,
			want: []string{`replicas must be a positive whole number, not "0"`, "Testfile:3"},
		},
		{
			name: "storage nats too many replicas",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					replicas 7
				}` + minimal + `}`,
			want: []string{"replicas must be 1 to 5 (JetStream's limit), not 7", "Testfile:3"},
		},
		{
			name: "storage nats token and user",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					token abc
					user relay pw
				}` + minimal + `}`,
			want: []string{"storage nats takes one kind of credentials (creds, token or user), not both token and user", "Testfile:4"},
		},
		{
			name: "storage nats creds and token",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					creds /etc/nats/relay.creds
					token abc
				}` + minimal + `}`,
			want: []string{"not both creds and token", "Testfile:4"},
		},
		{
			name: "storage nats stream twice",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					stream A
					stream B
				}` + minimal + `}`,
			want: []string{"storage nats: stream is set twice", "Testfile:4"},
		},
		{
			name: "storage nats user without password",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					user relay
				}` + minimal + `}`,
			want: []string{"user needs a name and a password: user <name> <password>", "Testfile:3"},
		},
		{
			name: "storage nats empty token",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					token ""
				}` + minimal + `}`,
			want: []string{"token is empty", "Testfile:3"},
		},
		{
			name: "storage nats tls_client with one file",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					tls_client /etc/nats/client.pem
				}` + minimal + `}`,
			want: []string{"tls_client needs a certificate file and a key file", "Testfile:3"},
		},
		{
			name: "storage nats stream name with a dot",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					stream okhi.prod
				}` + minimal + `}`,
			want: []string{`stream name "okhi.prod": use up to 128 letters, digits, '-' and '_'`, "Testfile:3"},
		},
		{
			name: "storage nats stream without a name",
			input: `webhook_relay {
				storage nats nats://n1:4222 {
					stream
				}` + minimal + `}`,
			want: []string{"stream needs one argument", "Testfile:3"},
		},
		{
			name: "dedupe off with extra argument",
			input: `webhook_relay {
				dedupe off now` + minimal + `}`,
			want: []string{`dedupe off takes no more arguments, got "now"`, "Testfile:2"},
		},
		{
			name: "dedupe with a word other than off",
			input: `webhook_relay {
				dedupe on` + minimal + `}`,
			want: []string{`dedupe takes 'off' or a block, not "on"`, "Testfile:2"},
		},
		{
			name: "dedupe key without path",
			input: `webhook_relay {
				dedupe {
					key
				}` + minimal + `}`,
			want: []string{"key needs at least one JSON path", "Testfile:3"},
		},
		{
			name: "forward with one argument",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward http://127.0.0.1:9000/hook
			}`,
			want: []string{"forward needs a target name and a URL", "Testfile:3"},
		},
		{
			name: "match without value",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					match v2.verification_status
				}
			}`,
			want: []string{"match needs a JSON path and at least one value", "Testfile:4"},
		},
		{
			name: "header with three arguments",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					header X-A b c
				}
			}`,
			want: []string{"header needs a field and a value", "Testfile:4"},
		},
		{
			name: "Host header",
			input: `webhook_relay {
				auth_header X-Secret s3cret
				forward t1 http://127.0.0.1:9000/hook {
					header host crm.example
				}
			}`,
			want: []string{"header Host cannot be set", "Testfile:4"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if err == nil {
				t.Fatalf("no error; want one containing %q", tt.want)
			}
			assertContains(t, err.Error(), tt.want...)
		})
	}
}

// assertContains fails t unless s contains every one of want.
func assertContains(t *testing.T, s string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(s, w) {
			t.Errorf("%q does not contain %q", s, w)
		}
	}
}

// TestAdaptErrors runs the whole Caddyfile adapter: errors that need more
// than one directive, and the file name and line of parse errors.
func TestAdaptErrors(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  []string
	}{
		{
			name: "two relays with the same name",
			input: `http://localhost:9080 {
	route /a {
		webhook_relay okhi {
			auth_header X-Secret a
			forward t1 http://127.0.0.1:9000/a
		}
	}
	route /b {
		webhook_relay okhi {
			auth_header X-Secret b
			forward t1 http://127.0.0.1:9000/b
		}
	}
}
`,
			want: []string{`two webhook_relay directives are named "okhi"`, "Caddyfile:9"},
		},
		{
			name: "two unnamed relays in two sites",
			input: `http://localhost:9080 {
	webhook_relay {
		auth_header X-Secret a
		forward t1 http://127.0.0.1:9000/a
	}
}

http://localhost:9081 {
	webhook_relay {
		auth_header X-Secret b
		forward t1 http://127.0.0.1:9000/b
	}
}
`,
			want: []string{`two webhook_relay directives are named "default"`, "Caddyfile:9"},
		},
		{
			name: "parse error carries file and line",
			input: `http://localhost:9080 {
	webhook_relay {
		auth_header X-Secret a
		forward t1 http://127.0.0.1:9000/a {
			timeout never
		}
	}
}
`,
			want: []string{`timeout: bad duration "never"`, "Caddyfile:5"},
		},
		{
			name: "two relays whose default NATS streams collide",
			input: `http://localhost:9080 {
	route /a {
		webhook_relay a.b {
			auth_header X-Secret a
			storage nats nats://127.0.0.1:4222
			forward t1 http://127.0.0.1:9000/a
		}
	}
	route /b {
		webhook_relay a_b {
			auth_header X-Secret b
			storage nats nats://127.0.0.1:4222
			forward t1 http://127.0.0.1:9000/b
		}
	}
}
`,
			want: []string{`webhook_relay "a.b" and "a_b" use the same NATS stream WEBHOOK_RELAY_A_B`, "set 'stream <name>'", "Caddyfile:10"},
		},
		{
			name: "two relays naming one NATS stream on different URLs",
			input: `http://localhost:9080 {
	route /a {
		webhook_relay one {
			auth_header X-Secret a
			storage nats nats://n1:4222 {
				stream SHARED
			}
			forward t1 http://127.0.0.1:9000/a
		}
	}
	route /b {
		webhook_relay two {
			auth_header X-Secret b
			storage nats nats://n2:4222 {
				stream SHARED
			}
			forward t1 http://127.0.0.1:9000/b
		}
	}
}
`,
			want: []string{`webhook_relay "one" and "two" use the same NATS stream SHARED`, "Caddyfile:12"},
		},
		{
			name: "an explicit stream equal to another relay's default",
			input: `http://localhost:9080 {
	route /a {
		webhook_relay okhi {
			auth_header X-Secret a
			storage nats nats://n1:4222
			forward t1 http://127.0.0.1:9000/a
		}
	}
	route /b {
		webhook_relay other {
			auth_header X-Secret b
			storage nats nats://n1:4222 {
				stream WEBHOOK_RELAY_OKHI
			}
			forward t1 http://127.0.0.1:9000/b
		}
	}
}
`,
			want: []string{`webhook_relay "okhi" and "other" use the same NATS stream WEBHOOK_RELAY_OKHI`, "Caddyfile:10"},
		},
		{
			name: "storage error inside a nats block carries file and line",
			input: `http://localhost:9080 {
	webhook_relay {
		auth_header X-Secret a
		storage nats nats://127.0.0.1:4222 {
			replicas 0
		}
		forward t1 http://127.0.0.1:9000/a
	}
}
`,
			want: []string{`replicas must be a positive whole number, not "0"`, "Caddyfile:5"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(tt.input), map[string]any{"filename": "Caddyfile"})
			if err == nil {
				t.Fatalf("no error; want one containing %q", tt.want)
			}
			assertContains(t, err.Error(), tt.want...)
		})
	}
}
