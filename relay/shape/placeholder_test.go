package shape

import (
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestURLPlaceholders(t *testing.T) {
	const body = `{"id": "a/b?c&d e", "n": 42, "dots": "..", "dot": ".", "obj": {"k": "v"}, "v2": {"user_id": "hbZ69KMuYB"}}`
	cases := []struct {
		name string
		url  string
		want string
	}{
		{"no placeholder", "http://127.0.0.1:9/hook?x={y}", "http://127.0.0.1:9/hook?x={y}"},
		{"event id in the path", "http://127.0.0.1:9/events/{event.id}", "http://127.0.0.1:9/events/evt_01"},
		{"received_at in the path, RFC 3339 UTC", "http://127.0.0.1:9/at/{event.received_at}", "http://127.0.0.1:9/at/2024-05-14T06:12:03Z"},
		{"received_at in the query", "http://127.0.0.1:9/at?t={event.received_at}", "http://127.0.0.1:9/at?t=2024-05-14T06%3A12%3A03Z"},
		{"a value with / ? & and space in the path", "http://127.0.0.1:9/u/{event.json.id}/x", "http://127.0.0.1:9/u/a%2Fb%3Fc&d%20e/x"},
		{"the same value in the query", "http://127.0.0.1:9/u?id={event.json.id}&k=1", "http://127.0.0.1:9/u?id=a%2Fb%3Fc%26d+e&k=1"},
		{"a number", "http://127.0.0.1:9/n/{event.json.n}", "http://127.0.0.1:9/n/42"},
		{"a nested path", "http://127.0.0.1:9/users/{event.json.v2.user_id}", "http://127.0.0.1:9/users/hbZ69KMuYB"},
		{"an object as its JSON text", "http://127.0.0.1:9/o?o={event.json.obj}", "http://127.0.0.1:9/o?o=%7B%22k%22%3A+%22v%22%7D"},
		{"missing is empty", "http://127.0.0.1:9/u/{event.json.nope}/x", "http://127.0.0.1:9/u//x"},
		{"dot-dot cannot climb", "http://127.0.0.1:9/a/{event.json.dots}/b", "http://127.0.0.1:9/a/%2E%2E/b"},
		{"dot cannot stay", "http://127.0.0.1:9/a/{event.json.dot}/b", "http://127.0.0.1:9/a/%2E/b"},
		{"dots in the query as they are", "http://127.0.0.1:9/a?d={event.json.dots}", "http://127.0.0.1:9/a?d=.."},
		{"right after the host, in the query", "http://127.0.0.1:9?id={event.id}", "http://127.0.0.1:9?id=evt_01"},
		{"several", "https://127.0.0.1:9/{event.id}/{event.json.n}?u={event.json.v2.user_id}#frag", "https://127.0.0.1:9/evt_01/42?u=hbZ69KMuYB#frag"},
		{"a gjson path with braces (multipath)", "http://127.0.0.1:9/m?m={event.json.{n,dots}}", "http://127.0.0.1:9/m?m=%7B%22n%22%3A42%2C%22dots%22%3A%22..%22%7D"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := build(t, mustCompile(t, Spec{URL: c.url}), input(body))
			if r.URL != c.want {
				t.Errorf("url = %s\nwant  %s", r.URL, c.want)
			}
			u, err := url.Parse(r.URL)
			if err != nil || u.Host != "127.0.0.1:9" {
				t.Errorf("url %s: host %q, %v; want host 127.0.0.1:9", r.URL, u.Host, err)
			}
		})
	}
}

// Whatever the payload holds, the URL keeps its path segments and query
// parameters.
func TestURLValuesStayOneSegmentOrParameter(t *testing.T) {
	p := mustCompile(t, Spec{URL: "http://127.0.0.1:9/a/{event.json.v}/b?q={event.json.v}&k=1"})
	for _, v := range []string{"x/y", "../../admin", "?admin=1", "#top", "a b", "%2F", "&k=2", "é", "\r\n", ";x=1"} {
		body := `{"v": ` + quote(v) + `}`
		r := build(t, p, input(body))
		u, err := url.Parse(r.URL)
		if err != nil {
			t.Fatalf("value %q: %v", v, err)
		}
		segs := strings.Split(u.EscapedPath(), "/")
		if len(segs) != 4 || segs[1] != "a" || segs[3] != "b" {
			t.Errorf("value %q: path %s, want /a/<one segment>/b", v, u.EscapedPath())
		}
		if seg, _ := url.PathUnescape(segs[2]); seg != v {
			t.Errorf("value %q: segment unescapes to %q", v, seg)
		}
		q := u.Query()
		if len(q) != 2 || q.Get("q") != v || q.Get("k") != "1" || u.Fragment != "" {
			t.Errorf("value %q: query %v fragment %q, want q=%q and k=1 only", v, q, u.Fragment, v)
		}
	}
}

func TestURLPlaceholderErrors(t *testing.T) {
	cases := []struct {
		url  string
		want string
	}{
		{"http://{event.json.host}/x", "is in the scheme, host or port"},
		{"http://127.0.0.1:{event.json.port}/x", "is in the scheme, host or port"},
		{"http://h{event.id}.example/x", "is in the scheme, host or port"},
		{"{event.json.scheme}://127.0.0.1/x", "is in the scheme, host or port"},
		{"http://127.0.0.1:9{event.id}", "is in the scheme, host or port"},
		{"http://u:{event.id}@127.0.0.1/x", "is in the scheme, host or port"},
		{"http://127.0.0.1/x#{event.id}", "is in the fragment, which is never sent"},
		{"http://127.0.0.1/x?a=1#f{event.id}", "is in the fragment, which is never sent"},
		{"http://127.0.0.1/x/{event.nope}", "unknown placeholder {event.nope}: want {event.id}, {event.received_at} or {event.json.<path>}"},
		{"http://127.0.0.1/x/{event.json.}", "placeholder {event.json.} needs a JSON path"},
		{"http://127.0.0.1/x/{event.id", "placeholder {event.id is not closed"},
		{"ftp://127.0.0.1/x/{event.id}", "the scheme must be http or https"},
		{"http:///x/{event.id}", "no host"},
	}
	for _, c := range cases {
		_, err := Compile(Spec{URL: c.url})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Compile url %s: err = %v, want one containing %q", c.url, err, c.want)
		}
	}
}

func TestHeaderPlaceholders(t *testing.T) {
	const body = `{"token": "abc", "tab": "a\tb", "n": 12345678901234567890, "v2": {"user_id": "hbZ69KMuYB"}}`
	p := mustCompile(t, Spec{Headers: header(
		"Authorization", "Bearer {event.json.token}",
		"X-Event", "{event.id}",
		"X-Received", "{event.received_at}",
		"X-User", "{event.json.v2.user_id}",
		"X-Missing", "<{event.json.nope}>",
		"X-Tab", "{event.json.tab}",
		"X-Big", "{event.json.n}",
		"X-Caddy-Like", "{path} {env.X} {event} {event_id}",
		"X-Two", "{event.id}",
		"X-Two", "static",
		"X-Escaped", EscapeText("from a file: {event.id}")+" {event.id}",
	)})
	r := build(t, p, input(body))
	want := map[string][]string{
		"Authorization": {"Bearer abc"},
		"X-Event":       {"evt_01"},
		"X-Received":    {"2024-05-14T06:12:03Z"},
		"X-User":        {"hbZ69KMuYB"},
		"X-Missing":     {"<>"},
		"X-Tab":         {"a\tb"},
		"X-Big":         {"12345678901234567890"},
		"X-Caddy-Like":  {"{path} {env.X} {event} {event_id}"},
		"X-Two":         {"evt_01", "static"},
		"X-Escaped":     {"from a file: {event.id} evt_01"},
	}
	for k, v := range want {
		if got := r.Header.Values(k); strings.Join(got, "|") != strings.Join(v, "|") {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
}

func TestHeaderInjectionIsRefused(t *testing.T) {
	p := mustCompile(t, Spec{Headers: header("X-Foo", "user {event.json.a}")})
	for _, v := range []string{"1\r\nX-Evil: 1", "\nX-Evil: 1", "x\ry", "nul\x00", "bell\a", "del\x7f"} {
		got := buildErr(t, p, input(`{"a": `+quote(v)+`}`))
		if want := "header X-Foo: the value of {event.json.a} holds a character a header cannot carry"; got != want {
			t.Errorf("value %q: error = %q, want %q", v, got, want)
		}
	}
	// The event id is ours, but is checked like any value.
	p = mustCompile(t, Spec{Headers: header("X-Id", "{event.id}")})
	in := input(`{}`)
	in.ID = "e\r\nX-Evil: 1"
	if got, want := buildErr(t, p, in), "header X-Id: the value of {event.id} holds a character a header cannot carry"; got != want {
		t.Errorf("error = %q, want %q", got, want)
	}
}

// A body that is not JSON has no value at any path: gjson's reading of
// such bytes never reaches a request.
func TestJSONPlaceholdersOnABodyThatIsNotJSON(t *testing.T) {
	p := mustCompile(t, Spec{URL: "http://127.0.0.1:9/{event.json.a}", Headers: header("X-A", "[{event.json.a}]")})
	r := build(t, p, input(`{"a": "x"`))
	if r.URL != "http://127.0.0.1:9/" || r.Header.Get("X-A") != "[]" {
		t.Errorf("url %s, X-A %q: want both empty", r.URL, r.Header.Get("X-A"))
	}
}

func TestReceivedAtIsUTCSeconds(t *testing.T) {
	p := mustCompile(t, Spec{Headers: header("X-At", "{event.received_at}")})
	in := input(`{}`)
	in.ReceivedAt = time.Date(2025, 1, 2, 3, 4, 5, 999999999, time.FixedZone("X", -7*3600))
	if got := build(t, p, in).Header.Get("X-At"); got != "2025-01-02T10:04:05Z" {
		t.Errorf("received_at = %q, want 2025-01-02T10:04:05Z", got)
	}
}

// quote is s as a JSON string.
func quote(s string) string {
	b, err := json.Marshal(s)
	if err != nil {
		panic(err)
	}
	return string(b)
}
