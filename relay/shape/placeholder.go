package shape

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/tidwall/gjson"
)

// placeholderPrefix opens every placeholder this package resolves; any
// other brace is text (Caddy has resolved its own before the config
// reaches us).
const placeholderPrefix = "{event."

// EscapeText makes s text in a template: no {event.*} in it is expanded.
func EscapeText(s string) string {
	return strings.ReplaceAll(s, placeholderPrefix, `\`+placeholderPrefix)
}

type partKind uint8

const (
	literal partKind = iota
	eventID
	receivedAt
	jsonPath
)

// escaping is what a value goes through where it lands in a URL.
type escaping uint8

const (
	asIs escaping = iota
	pathEscaped
	queryEscaped
)

// part is a run of text or one placeholder of a template.
type part struct {
	kind partKind
	text string // the literal, or the placeholder as written (for messages)
	path string // gjson path of a jsonPath part
	esc  escaping
}

// template is a configured string with its {event.*} placeholders found
// once, at compile time.
type template []part

func (t template) static() bool {
	return len(t) == 0 || len(t) == 1 && t[0].kind == literal
}

// literal is the text of a static template.
func (t template) literal() string {
	if len(t) == 0 {
		return ""
	}
	return t[0].text
}

// parseTemplate splits s into text and placeholders. A gjson path may
// hold braces of its own (multipaths, queries), so a placeholder closes at
// the brace that balances its opening one; a backslash escapes the next
// byte, as in gjson.
//
// `\{event.` is the text "{event.": the Caddy module escapes what its own
// placeholders ({env.X}, {file.X}) resolved to that way, so that their
// output is never expanded again.
func parseTemplate(s string) (template, error) {
	var t template
	text := func(x string) {
		if x == "" {
			return
		}
		if n := len(t); n > 0 && t[n-1].kind == literal {
			t[n-1].text += x
			return
		}
		t = append(t, part{kind: literal, text: x})
	}
	for s != "" {
		i := strings.Index(s, placeholderPrefix)
		if i < 0 {
			text(s)
			break
		}
		if i > 0 && s[i-1] == '\\' {
			text(s[:i-1] + "{")
			s = s[i+1:]
			continue
		}
		text(s[:i])
		end := closingBrace(s[i:])
		if end < 0 {
			return nil, fmt.Errorf("placeholder %s is not closed: a } is missing", s[i:])
		}
		p, err := placeholder(s[i : i+end+1])
		if err != nil {
			return nil, err
		}
		t = append(t, p)
		s = s[i+end+1:]
	}
	return t, nil
}

// closingBrace is the index of the brace closing the one s starts with,
// or -1.
func closingBrace(s string) int {
	depth := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case '{':
			depth++
		case '}':
			depth--
			if depth == 0 {
				return i
			}
		}
	}
	return -1
}

// placeholder reads one {event.*}.
func placeholder(text string) (part, error) {
	name := text[1 : len(text)-1]
	switch {
	case name == "event.id":
		return part{kind: eventID, text: text}, nil
	case name == "event.received_at":
		return part{kind: receivedAt, text: text}, nil
	case strings.HasPrefix(name, "event.json."):
		path := strings.TrimPrefix(name, "event.json.")
		if path == "" {
			return part{}, fmt.Errorf("placeholder %s needs a JSON path after event.json (as in {event.json.v2.user_id})", text)
		}
		return part{kind: jsonPath, text: text, path: path}, nil
	}
	return part{}, fmt.Errorf("unknown placeholder %s: want {event.id}, {event.received_at} or {event.json.<path>}", text)
}

// event is what placeholders read of one event, each value worked out
// at most once per Build.
type event struct {
	in        *Input
	checked   bool // whether the body has been checked for JSON
	validJSON bool
}

func (e *event) value(p *part) string {
	switch p.kind {
	case eventID:
		return e.in.ID
	case receivedAt:
		return e.in.ReceivedAt.UTC().Format(time.RFC3339)
	case jsonPath:
		// gjson reads what it can of bytes that are not JSON; a body that
		// is not JSON has no value at any path, so none leaks out of it.
		if !e.checked {
			e.checked, e.validJSON = true, gjson.ValidBytes(e.in.Body)
		}
		if !e.validJSON {
			return ""
		}
		return gjson.GetBytes(e.in.Body, p.path).String()
	}
	return p.text
}

// compileURL finds the placeholders of a URL template and checks that
// they sit in its path or query only: the scheme, host and port are never
// templated, and a fragment is never sent.
func compileURL(raw string) (template, error) {
	t, err := parseTemplate(raw)
	if err != nil {
		return nil, fmt.Errorf("url %s: %w", raw, err)
	}
	var where urlPosition
	for i := range t {
		p := &t[i]
		if p.kind == literal {
			where.read(p.text)
			continue
		}
		switch where.state {
		case inAuthority:
			return nil, fmt.Errorf("url %s: %s is in the scheme, host or port, which cannot hold placeholders (only the path and query can)", raw, p.text)
		case inFragment:
			return nil, fmt.Errorf("url %s: %s is in the fragment, which is never sent (only the path and query can hold placeholders)", raw, p.text)
		case inPath:
			p.esc = pathEscaped
		case inQuery:
			p.esc = queryEscaped
		}
	}
	// What the URL is with every placeholder empty must be a URL already.
	var b strings.Builder
	for _, p := range t {
		if p.kind == literal {
			b.WriteString(p.text)
		}
	}
	u, err := url.Parse(b.String())
	if err != nil {
		return nil, fmt.Errorf("url %s: %w", raw, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("url %s: the scheme must be http or https", raw)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("url %s: no host", raw)
	}
	return t, nil
}

// urlPosition is where the text read so far leaves us in a URL. Only
// literal text moves it: a placeholder's value is escaped, so it cannot.
type urlPosition struct {
	afterScheme bool // "://" has been read
	state       int
}

const (
	inAuthority = iota // scheme, host and port
	inPath
	inQuery
	inFragment
)

func (w *urlPosition) read(text string) {
	if w.state == inAuthority {
		if !w.afterScheme {
			k := strings.Index(text, "://")
			if k < 0 {
				return
			}
			w.afterScheme, text = true, text[k+len("://"):]
		}
		j := strings.IndexAny(text, "/?#")
		if j < 0 {
			return
		}
		w.state = opens(text[j])
		text = text[j+1:]
	}
	if w.state == inPath {
		j := strings.IndexAny(text, "?#")
		if j < 0 {
			return
		}
		w.state = opens(text[j])
		text = text[j+1:]
	}
	if w.state == inQuery && strings.IndexByte(text, '#') >= 0 {
		w.state = inFragment
	}
}

// opens is the part of a URL that c starts.
func opens(c byte) int {
	switch c {
	case '/':
		return inPath
	case '?':
		return inQuery
	}
	return inFragment
}

// expandURL fills a URL template in, each value escaped for where it
// stands, so that no value can add a path segment, a query parameter or
// a fragment.
func expandURL(t template, e *event) (string, error) {
	var b strings.Builder
	for i := range t {
		p := &t[i]
		if p.kind == literal {
			b.WriteString(p.text)
			continue
		}
		v := e.value(p)
		switch p.esc {
		case pathEscaped:
			b.WriteString(escapePath(v))
		default:
			b.WriteString(url.QueryEscape(v))
		}
	}
	s := b.String()
	if _, err := url.Parse(s); err != nil {
		return "", fmt.Errorf("the url is not valid once its placeholders are filled in: %w", err)
	}
	return s, nil
}

// escapePath is url.PathEscape, and dots too when the value is nothing
// but dots: "." and ".." would otherwise move the request up the path
// wherever the target's server cleans it.
func escapePath(v string) string {
	if v != "" && strings.Trim(v, ".") == "" {
		return strings.Repeat("%2E", len(v))
	}
	return url.PathEscape(v)
}

// errHeaderValue says a value cannot go in a header.
var errHeaderValue = errors.New("holds a character a header cannot carry")

// expandHeader fills a header value in; a placeholder's value holding a
// control character (other than tab) is refused rather than cleaned, so
// that a payload can never add a header or split the request.
func expandHeader(key string, t template, e *event) (string, error) {
	if len(t) == 1 {
		return expandHeaderPart(key, &t[0], e)
	}
	var b strings.Builder
	for i := range t {
		v, err := expandHeaderPart(key, &t[i], e)
		if err != nil {
			return "", err
		}
		b.WriteString(v)
	}
	return b.String(), nil
}

func expandHeaderPart(key string, p *part, e *event) (string, error) {
	if p.kind == literal {
		return p.text, nil
	}
	v := e.value(p)
	if !validHeaderValue(v) {
		return "", fmt.Errorf("header %s: the value of %s %w", key, p.text, errHeaderValue)
	}
	return v, nil
}

// validHeaderValue refuses CR, LF, NUL and every other control character
// but tab; bytes from 0x80 up are obs-text, which HTTP allows.
func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}
