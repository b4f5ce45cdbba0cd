package shape

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestTransform(t *testing.T) {
	cases := []struct {
		name    string
		program string
		body    string
		want    string
	}{
		// Caddy rewrites {path} in a Caddyfile token before the module
		// sees it: object shorthand must be written out.
		{"object shorthand written out", `{path: .path, id: .v2.user_id}`, `{"path": "/a", "v2": {"user_id": "u1"}}`, `{"id":"u1","path":"/a"}`},
		{"the body as is", `.`, `{"a": [1, "x", null, true]}`, `{"a":[1,"x",null,true]}`},
		{"a number", `.v2 | length`, okhiV2, `6`},
		{"null", `.missing`, `{}`, `null`},
		{"no HTML escaping", `{s: .s}`, `{"s": "<a & b>"}`, `{"s":"<a & b>"}`},
		{"one value, then halt", `1, halt`, `{}`, `1`},
		{"big integers kept exact", `{test: .test, big: .big, neg: .neg}`,
			`{"test": 2432232314, "big": 12345678901234567890, "neg": -12345678901234567890}`,
			`{"big":12345678901234567890,"neg":-12345678901234567890,"test":2432232314}`},
		{"number literals kept as written", `.`, `{"a": 1.50, "b": 1e3, "c": 12345678901234567890123}`, `{"a":1.50,"b":1e3,"c":12345678901234567890123}`},
		{"arithmetic on a big integer stays exact", `.big + 1`, `{"big": 12345678901234567890}`, `12345678901234567891`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := build(t, mustCompile(t, Spec{Transform: c.program}), input(c.body))
			if string(r.Body) != c.want {
				t.Errorf("body = %s, want %s", r.Body, c.want)
			}
			if ct := r.Header.Get("Content-Type"); ct != ContentTypeJSON {
				t.Errorf("Content-Type = %q, want %q", ct, ContentTypeJSON)
			}
		})
	}
}

func TestTransformToXML(t *testing.T) {
	program := `"<?xml version=\"1.0\"?><soap:Envelope xmlns:soap=\"http://www.w3.org/2003/05/soap-envelope\"><soap:Body>` +
		`<Verified id=\"\(.v2.address_verification_id)\" status=\"\(.v2.verification_status)\"/></soap:Body></soap:Envelope>"`
	p := mustCompile(t, Spec{Okhi: true, Transform: program, ContentType: "application/soap+xml"})
	r := build(t, p, input(okhiV2))
	want := `<?xml version="1.0"?><soap:Envelope xmlns:soap="http://www.w3.org/2003/05/soap-envelope"><soap:Body>` +
		`<Verified id="ONYgUOybCU" status="verified"/></soap:Body></soap:Envelope>`
	if string(r.Body) != want {
		t.Errorf("body = %s\nwant %s", r.Body, want)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/soap+xml" {
		t.Errorf("Content-Type = %q, want application/soap+xml", ct)
	}
}

func TestTransformErrors(t *testing.T) {
	cases := []struct {
		name string
		spec Spec
		body string
		want string
	}{
		{"error()", Spec{Transform: `error("no user")`}, `{}`, "transform: jq: error: no user"},
		{"error() of an object", Spec{Transform: `error({code: 1})`}, `{}`, `transform: jq: error: {"code":1}`},
		{"jq's own error", Spec{Transform: `.v2.user_id.x`}, okhiV2, `transform: jq: error: expected an object but got: string ("hbZ69KMuYB")`},
		{"the file's name", Spec{Transform: `.a + 1`, TransformName: "orders.jq"}, `{"a": "x"}`, `orders.jq: jq: error: cannot add: string ("x") and number (1)`},
		{"halt_error", Spec{Transform: `"stop" | halt_error`}, `{}`, "transform: jq: halt error: stop"},
		{"an error after a value", Spec{Transform: `1, error("late")`}, `{}`, "transform: jq: error: late"},
		{"no value", Spec{Transform: `empty`}, `{}`, "transform produced no value: it must produce exactly one, the body"},
		{"no value: select", Spec{Transform: `select(.a)`}, `{}`, "transform produced no value: it must produce exactly one, the body"},
		{"no value: halt", Spec{Transform: `halt`}, `{}`, "transform produced no value: it must produce exactly one, the body"},
		{"two values", Spec{Transform: `.v2.user_id, .v2.location_id`}, okhiV2, "transform produced more than one value: it must produce exactly one, the body"},
		{"many values", Spec{Transform: `range(1e9)`, TransformName: "r.jq"}, `{}`, "r.jq produced more than one value: it must produce exactly one, the body"},
		{"a body that is not JSON", Spec{Transform: `.`}, `a,b,c`, "transform: the body is not JSON: invalid character 'a' looking for beginning of value"},
		{"an empty body", Spec{Transform: `.`}, ``, "transform: the body is not JSON: it is empty"},
		{"two JSON values", Spec{Transform: `.`}, `{} {}`, "transform: the body is not JSON: it holds more than one JSON value"},
		{"a truncated body", Spec{Transform: `.`}, `{"a": [1, 2`, "transform: the body is not JSON: unexpected EOF"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.spec.URL = testURL
			if got := buildErr(t, mustCompile(t, c.spec), input(c.body)); got != c.want {
				t.Errorf("error = %q\nwant    %q", got, c.want)
			}
		})
	}
}

func TestTransformUnderTheAttemptsContext(t *testing.T) {
	p := mustCompile(t, Spec{Transform: `last(range(1e15))`})

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	_, err := p.Build(ctx, input(`{}`), testNow)
	if err == nil || err.Error() != "transform timed out" || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want \"transform timed out\" wrapping context.DeadlineExceeded", err)
	}

	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	_, err = p.Build(ctx, input(`{}`), testNow)
	if err == nil || !errors.Is(err, context.Canceled) || !strings.HasPrefix(err.Error(), "transform stopped") {
		t.Errorf("err = %v, want \"transform stopped\" wrapping context.Canceled", err)
	}
}

func TestCheckTransform(t *testing.T) {
	cases := []struct {
		program string
		want    string // "" for none
	}{
		{`{id: .v2.address_verification_id}`, ""},
		{`{path: .path}`, ""},
		{"def f: .a;\n{x: f}", ""},
		{`.a |`, "jq: syntax error at line 1, column 5: unexpected EOF"},
		{"{a: 1,\n  b: }", `jq: syntax error at line 2, column 6: unexpected token "}"`},
		{`nosuch`, "jq: compile error: function not defined: nosuch/0"},
		{`$x`, "jq: compile error: variable not defined: $x"},
		{`input`, "jq: compile error: input(s)/0 is not allowed"},
		{`import "m" as m; .`, "jq: compile error: cannot load module: \"m\""},
	}
	for _, c := range cases {
		err := CheckTransform(c.program)
		switch {
		case c.want == "" && err != nil:
			t.Errorf("CheckTransform(%q) = %v, want nil", c.program, err)
		case c.want != "" && (err == nil || err.Error() != c.want):
			t.Errorf("CheckTransform(%q) = %v, want %q", c.program, err, c.want)
		}
	}
}
