package shape

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
)

func TestPlainForwardsTheEventAsReceived(t *testing.T) {
	p := mustCompile(t, Spec{Okhi: true, Headers: header("x-api-key", "k1", "X-Team", "a", "X-Team", "b")})
	in := input(okhiV2)
	r := build(t, p, in)
	if r.Method != http.MethodPost {
		t.Errorf("method = %q, want POST", r.Method)
	}
	if r.URL != testURL {
		t.Errorf("url = %q, want %q", r.URL, testURL)
	}
	if !bytes.Equal(r.Body, in.Body) || &r.Body[0] != &in.Body[0] {
		t.Errorf("body is not the original bytes, uncopied")
	}
	want := http.Header{
		"Content-Type": {"application/json"},
		"X-Api-Key":    {"k1"},
		"X-Team":       {"a", "b"},
	}
	if !equalHeader(r.Header, want) {
		t.Errorf("header = %v, want %v", r.Header, want)
	}
}

func TestContentTypeOfThePlainBody(t *testing.T) {
	cases := []struct {
		name       string
		configured http.Header
		received   string
		want       string
	}{
		{"the received type", nil, "application/xml", "application/xml"},
		{"none received, none configured", nil, "", ""},
		{"none received: the configured line", header("content-type", "text/csv"), "", "text/csv"},
		{"received wins over configured", header("Content-Type", "text/csv"), "application/json", "application/json"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := mustCompile(t, Spec{Headers: c.configured})
			in := input("a,b")
			in.ContentType = c.received
			r := build(t, p, in)
			if got := r.Header.Get("Content-Type"); got != c.want {
				t.Errorf("Content-Type = %q, want %q", got, c.want)
			}
			if n := len(r.Header.Values("Content-Type")); c.want != "" && n != 1 {
				t.Errorf("%d Content-Type lines, want 1", n)
			}
		})
	}
}

func TestMethod(t *testing.T) {
	for method, want := range map[string]string{"": "POST", "POST": "POST", "PUT": "PUT", "PATCH": "PATCH"} {
		p := mustCompile(t, Spec{Method: method})
		if got := build(t, p, input(`{}`)).Method; got != want {
			t.Errorf("method %q: request method = %q, want %q", method, got, want)
		}
	}
	if _, err := Compile(Spec{Method: "GET", URL: testURL}); err == nil || !strings.Contains(err.Error(), "want POST, PUT or PATCH") {
		t.Errorf("method GET: err = %v, want one naming POST, PUT or PATCH", err)
	}
}

func TestCompileErrors(t *testing.T) {
	cases := []struct {
		name string
		spec Spec
		want string
	}{
		{"documented_only on generic", Spec{DocumentedOnly: true}, "documented_only needs source okhi"},
		{"content_type without transform", Spec{ContentType: "application/xml"}, "content_type is for a transform"},
		{"content_type with form", Spec{Transform: ".", ContentType: "text/xml", Form: true}, "cannot both be set"},
		{"content_type with a newline", Spec{Transform: ".", ContentType: "text/xml\r\nX: 1"}, "a header cannot carry"},
		{"a transform that does not parse", Spec{Transform: "{id: .a"}, "transform: jq: syntax error at line 1"},
		{"a transform file that does not compile", Spec{Transform: "nosuch(1)", TransformName: "map.jq"}, "map.jq: jq: compile error: function not defined: nosuch/1"},
		{"a secret without whsec_", Spec{Secrets: []string{"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}, "must start with whsec_"},
		{"a bad header name", Spec{Headers: http.Header{"X Bad": {"1"}}}, `header "X Bad": not a valid header name`},
		{"a configured header value with CR LF", Spec{Headers: http.Header{"X-A": {"1\r\nX-Evil: 1"}}}, "header X-A: the value"},
		{"an unknown placeholder in a header", Spec{Headers: header("X-A", "{event.name}")}, "unknown placeholder {event.name}"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.spec.URL = testURL
			_, err := Compile(c.spec)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Compile: err = %v, want one containing %q", err, c.want)
			}
		})
	}
}

func TestContentTypeOfBuiltBodies(t *testing.T) {
	cases := []struct {
		name string
		spec Spec
		want string
	}{
		{"documented_only", Spec{Okhi: true, DocumentedOnly: true}, ContentTypeJSON},
		{"a transform yielding an object", Spec{Transform: "{id: .v2.user_id}"}, ContentTypeJSON},
		{"a transform yielding a number", Spec{Transform: "1"}, ContentTypeJSON},
		{"a transform yielding a string", Spec{Transform: ".v2.user_id"}, ContentTypeText},
		{"a string with content_type", Spec{Transform: ".v2.user_id", ContentType: "application/soap+xml"}, "application/soap+xml"},
		{"content_type ignored for an object", Spec{Transform: ".v2", ContentType: "application/soap+xml"}, ContentTypeJSON},
		{"form", Spec{Form: true}, ContentTypeForm},
		{"form of a transform", Spec{Transform: ".v2", Form: true}, ContentTypeForm},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := input(okhiV2)
			in.ContentType = "application/vnd.okhi+json"
			r := build(t, mustCompile(t, c.spec), in)
			if got := r.Header.Values("Content-Type"); len(got) != 1 || got[0] != c.want {
				t.Errorf("Content-Type = %q, want %q", got, c.want)
			}
		})
	}
}

func TestMaxBodyBoundsBuiltBodies(t *testing.T) {
	cases := []struct {
		name string
		spec Spec
		want string
	}{
		{"a JSON output", Spec{Transform: "[range(100)]"}, "transform's output is 291 bytes, over max_body (100 bytes)"},
		{"a string output", Spec{Transform: `"x" * 101`, TransformName: "big.jq"}, "big.jq's output is 101 bytes, over max_body (100 bytes)"},
		{"a form body", Spec{Transform: `{a: ("x" * 100)}`, Form: true}, "the form body is 102 bytes, over max_body (100 bytes)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.spec.MaxBody = 100
			if got := buildErr(t, mustCompile(t, c.spec), input(`{}`)); got != c.want {
				t.Errorf("error = %q, want %q", got, c.want)
			}
		})
	}
	// The original body was bounded when it came in (perhaps under another
	// max_body): forwarded as is, it is not built, so not bounded again.
	big := `{"pad": "` + strings.Repeat("x", 200) + `"}`
	if r := build(t, mustCompile(t, Spec{MaxBody: 100}), input(big)); string(r.Body) != big {
		t.Errorf("plain body over max_body was not forwarded as is")
	}
}

// The engine adds its headers to what Build returns: one request's header
// must not reach into another's, nor into the Pipeline's.
func TestHeadersAreEachRequestsOwn(t *testing.T) {
	p := mustCompile(t, Spec{Headers: header("X-Static", "s", "X-Id", "{event.id}")})
	a := build(t, p, input(`{}`))
	a.Header.Add("X-Static", "added")
	a.Header.Add("X-Id", "added")
	a.Header.Add("Content-Type", "added")
	a.Header.Set("Idempotency-Key", "k")
	b := build(t, p, input(`{}`))
	want := http.Header{"X-Static": {"s"}, "X-Id": {"evt_01"}, "Content-Type": {"application/json"}}
	if !equalHeader(b.Header, want) {
		t.Errorf("second request's header = %v, want %v", b.Header, want)
	}
}

func TestBuildIsSafeForConcurrentUse(t *testing.T) {
	p := mustCompile(t, Spec{
		Okhi: true, DocumentedOnly: true, Transform: "{id: .v2.user_id}", Form: true,
		URL:     "http://127.0.0.1:9/u/{event.json.v2.user_id}",
		Headers: header("X-Id", "{event.id}"), Secrets: []string{testSecret},
	})
	want := build(t, p, input(okhiV2))
	errs := make(chan error, 8)
	for range 8 {
		go func() {
			for range 50 {
				r, err := p.Build(context.Background(), input(okhiV2), testNow)
				if err == nil && (string(r.Body) != string(want.Body) || !equalHeader(r.Header, want.Header) || r.URL != want.URL) {
					err = fmt.Errorf("concurrent Build gave %v %s %q, want %v %s %q", r.Header, r.URL, r.Body, want.Header, want.URL, want.Body)
				}
				if err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func equalHeader(a, b http.Header) bool {
	if len(a) != len(b) {
		return false
	}
	for k, av := range a {
		bv, ok := b[k]
		if !ok || len(av) != len(bv) {
			return false
		}
		for i := range av {
			if av[i] != bv[i] {
				return false
			}
		}
	}
	return true
}

// benchBuild measures Build of one OkHi v2 event through spec's pipeline.
func benchBuild(b *testing.B, spec Spec) {
	p := mustCompile(b, spec)
	in := input(okhiV2)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.Build(ctx, in, testNow); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkBuildPlain(b *testing.B) {
	benchBuild(b, Spec{Okhi: true, Headers: header("X-Api-Key", "k1", "X-Team", "payments")})
}

func BenchmarkBuildTransform(b *testing.B) {
	benchBuild(b, Spec{Okhi: true, Transform: "{id: .v2.address_verification_id, status: .v2.verification_status, user: .v2.user_id}"})
}

// BenchmarkBuildSigned is the plain pass-through plus one Standard
// Webhooks signature: the cost of signing alone.
func BenchmarkBuildSigned(b *testing.B) {
	benchBuild(b, Spec{Okhi: true, Secrets: []string{testSecret}})
}

// BenchmarkBuildLegacy is a typical legacy shaping: documented_only, a
// transform, a form body, a placeholder header and a signature.
func BenchmarkBuildLegacy(b *testing.B) {
	benchBuild(b, Spec{
		Okhi: true, DocumentedOnly: true, Form: true, Secrets: []string{testSecret},
		Transform: "{id: .v2.address_verification_id, status: .v2.verification_status, user: .v2.user_id}",
		URL:       "http://127.0.0.1/addresses/{event.json.v2.address_verification_id}",
		Headers:   header("X-Event", "{event.id}"),
	})
}
