package shape

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"time"

	"github.com/itchyny/gojq"
	"golang.org/x/net/http/httpguts"
)

// Content types of built bodies.
const (
	ContentTypeJSON = "application/json"
	ContentTypeText = "text/plain; charset=utf-8"
	ContentTypeForm = "application/x-www-form-urlencoded"
)

// Spec is what one target's requests are made of, as configured.
type Spec struct {
	// Okhi is the okhi source (whose bodies documented_only reads);
	// false is the generic source.
	Okhi bool
	// Method is POST, PUT or PATCH; "" is POST.
	Method string
	// URL may hold {event.id}, {event.received_at} and
	// {event.json.<gjson path>} in its path and query.
	URL string
	// Headers are the configured header lines; their values may hold the
	// same placeholders.
	Headers        http.Header
	DocumentedOnly bool
	// Transform is a jq program whose single output becomes the body;
	// "" is none. TransformName names it in errors (its file, or
	// "transform", the default).
	Transform     string
	TransformName string
	// ContentType goes with a transform's string output; "" is
	// text/plain; charset=utf-8.
	ContentType string
	// Form is body_format form.
	Form bool
	// Secrets are Standard Webhooks secrets (whsec_<base64>), one
	// signature each.
	Secrets []string
	// MaxBody bounds a built body (0: no bound). The original body, sent
	// as received, is not built, and was bounded when it came in.
	MaxBody int64
}

// Pipeline builds one target's request for an event. It is compiled
// once per config load and safe for concurrent use.
type Pipeline struct {
	method string
	url    template
	// headers are the configured lines in sorted order; keys are
	// canonical.
	headers []headerLine
	// dynamic is how many header values Build makes per request (at most).
	dynamic int

	shaped        bool // any of documented, code, form: the body is built
	documented    bool
	code          *gojq.Code
	transformName string
	contentType   string // of a transform's string output
	// contentTypeValue is contentType as a header value, shared.
	contentTypeValue []string
	form             bool
	keys             [][]byte
	maxBody          int64
	// mapSize is how many keys a request's header ends up with, the
	// engine's included, so that the map is made once at its size.
	mapSize int
}

// engineHeaders is how many headers the engine adds to a built request.
const engineHeaders = 4

// headerLine is one configured header: its values shared by every request
// when they hold no placeholder, else one template per value.
type headerLine struct {
	key       string
	static    []string
	templates []template
}

// Input is the event a request is built for.
type Input struct {
	ID          string // the event_id
	ReceivedAt  time.Time
	ContentType string // as received
	Body        []byte // as received; never modified
}

// Request is what the target receives, before the engine adds its own
// headers (Idempotency-Key, X-Webhook-Relay-*, User-Agent). Header is a
// new map per request, so Set and Add are the caller's to use; its value
// slices may be shared with the Pipeline, so they are not to be written in
// place. Body may be Input.Body itself.
type Request struct {
	Method string
	URL    string
	Header http.Header
	Body   []byte
}

// Compile checks s and prepares everything Build needs: the jq program
// parsed and compiled, the URL and header templates parsed, the secrets
// decoded.
func Compile(s Spec) (*Pipeline, error) {
	p := &Pipeline{
		method:        s.Method,
		documented:    s.DocumentedOnly,
		form:          s.Form,
		contentType:   s.ContentType,
		transformName: s.TransformName,
		maxBody:       s.MaxBody,
	}
	switch p.method {
	case "":
		p.method = http.MethodPost
	case http.MethodPost, http.MethodPut, http.MethodPatch:
	default:
		return nil, fmt.Errorf("method %q: want POST, PUT or PATCH", s.Method)
	}
	if s.DocumentedOnly && !s.Okhi {
		return nil, errors.New("documented_only needs source okhi: a generic body has no documented fields")
	}
	if s.ContentType != "" && s.Transform == "" {
		return nil, errors.New("content_type is for a transform whose output is a string: add a transform")
	}
	if s.ContentType != "" && s.Form {
		return nil, errors.New("content_type and body_format form cannot both be set: a form body is application/x-www-form-urlencoded")
	}
	if s.ContentType != "" && !httpguts.ValidHeaderFieldValue(s.ContentType) {
		return nil, fmt.Errorf("content_type %q holds a character a header cannot carry", s.ContentType)
	}
	if p.contentType == "" {
		p.contentType = ContentTypeText
	}
	p.contentTypeValue = []string{p.contentType}
	if s.Transform != "" {
		if p.transformName == "" {
			p.transformName = "transform"
		}
		code, err := compileJQ(s.Transform)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p.transformName, err)
		}
		p.code = code
	}
	p.shaped = p.documented || p.code != nil || p.form

	var err error
	if p.url, err = compileURL(s.URL); err != nil {
		return nil, err
	}
	if err := p.compileHeaders(s.Headers); err != nil {
		return nil, err
	}
	for _, secret := range s.Secrets {
		key, err := DecodeSecret(secret)
		if err != nil {
			return nil, err
		}
		p.keys = append(p.keys, key)
	}
	if len(p.keys) > 0 {
		p.dynamic += 3
	}
	p.mapSize = len(p.headers) + 1 + engineHeaders
	if len(p.keys) > 0 {
		p.mapSize += 3
	}
	return p, nil
}

func (p *Pipeline) compileHeaders(h http.Header) error {
	lines := map[string]*headerLine{}
	for k, vals := range h {
		if !httpguts.ValidHeaderFieldName(k) {
			return fmt.Errorf("header %q: not a valid header name", k)
		}
		if len(vals) == 0 {
			continue
		}
		key := http.CanonicalHeaderKey(k)
		l := lines[key]
		if l == nil {
			l = &headerLine{key: key}
			lines[key] = l
		}
		for _, v := range vals {
			t, err := parseTemplate(v)
			if err != nil {
				return fmt.Errorf("header %s: %w", key, err)
			}
			for _, pt := range t {
				if pt.kind == literal && !httpguts.ValidHeaderFieldValue(pt.text) {
					return fmt.Errorf("header %s: the value %q holds a character a header cannot carry", key, v)
				}
			}
			l.templates = append(l.templates, t)
		}
	}
	for _, l := range lines {
		static := true
		for _, t := range l.templates {
			static = static && t.static()
		}
		if static {
			for _, t := range l.templates {
				l.static = append(l.static, t.literal())
			}
			// Clipped, so that an Add on one request's header copies
			// rather than writes into what every request shares.
			l.static = l.static[:len(l.static):len(l.static)]
			l.templates = nil
		} else {
			p.dynamic += len(l.templates)
		}
		p.headers = append(p.headers, *l)
	}
	sort.Slice(p.headers, func(i, j int) bool { return p.headers[i].key < p.headers[j].key })
	return nil
}

// Build makes the request one target receives for in, at now (the
// attempt's time, for the signature). ctx bounds the transform. Its
// errors are sentences for last_error: the event cannot be shaped for
// this target, and no retry would change that.
func (p *Pipeline) Build(ctx context.Context, in Input, now time.Time) (Request, error) {
	body, ctype, err := p.body(ctx, &in)
	if err != nil {
		return Request{}, err
	}
	e := event{in: &in}
	r := Request{Method: p.method, Body: body}
	if p.url.static() {
		r.URL = p.url.literal()
	} else if r.URL, err = expandURL(p.url, &e); err != nil {
		return Request{}, err
	}

	r.Header = make(http.Header, p.mapSize)
	// Every value made here comes out of one allocation, none at all for
	// static headers and a common Content-Type; each key's slice is
	// clipped so that an Add copies it.
	ctShared := p.sharedValue(ctype)
	var vals []string
	if n := p.dynamic + btoi(ctype != "" && ctShared == nil); n > 0 {
		vals = make([]string, 0, n)
	}
	for i := range p.headers {
		l := &p.headers[i]
		if l.static != nil {
			r.Header[l.key] = l.static
			continue
		}
		start := len(vals)
		for _, t := range l.templates {
			v, err := expandHeader(l.key, t, &e)
			if err != nil {
				return Request{}, err
			}
			vals = append(vals, v)
		}
		r.Header[l.key] = vals[start:len(vals):len(vals)]
	}
	// The body's own type wins over a configured Content-Type line, as
	// it did before bodies could be shaped; an original body without one
	// leaves the configured line.
	switch {
	case ctShared != nil:
		r.Header["Content-Type"] = ctShared
	case ctype != "":
		if !validHeaderValue(ctype) {
			return Request{}, errors.New("the event's Content-Type holds a character a header cannot carry")
		}
		vals = append(vals, ctype)
		r.Header["Content-Type"] = vals[len(vals)-1 : len(vals) : len(vals)]
	}
	if len(p.keys) > 0 {
		if !validHeaderValue(in.ID) {
			return Request{}, errors.New("sign standard_webhooks: the event id holds a character a header cannot carry")
		}
		ts := timestamp(now)
		vals = append(vals, in.ID, ts, signature(p.keys, in.ID, ts, body))
		n := len(vals)
		r.Header[HeaderWebhookID] = vals[n-3 : n-2 : n-2]
		r.Header[HeaderWebhookTimestamp] = vals[n-2 : n-1 : n-1]
		r.Header[HeaderWebhookSignature] = vals[n-1 : n : n]
	}
	return r, nil
}

// body is the body as sent and its Content-Type: documented_only, then
// the transform, then the body format.
func (p *Pipeline) body(ctx context.Context, in *Input) ([]byte, string, error) {
	if !p.shaped {
		return in.Body, in.ContentType, nil
	}
	body := in.Body
	if p.documented {
		var err error
		if body, err = documented(body); err != nil {
			return nil, "", err
		}
	}
	var v any
	what := "the body"
	switch {
	case p.code != nil:
		var err error
		if v, err = p.transform(ctx, body); err != nil {
			return nil, "", err
		}
		what = p.transformName + "'s output"
		if s, ok := v.(string); ok {
			if p.form {
				return nil, "", fmt.Errorf("body_format form needs a JSON object, and %s is a string", what)
			}
			return p.bounded([]byte(s), p.contentType, what)
		}
	case p.form:
		var err error
		if v, err = decodeJSON(body); err != nil {
			return nil, "", fmt.Errorf("body_format form: the body is not JSON: %w", err)
		}
	default: // documented_only alone
		return p.bounded(body, ContentTypeJSON, what)
	}
	if p.form {
		b, err := formBody(v, what)
		if err != nil {
			return nil, "", err
		}
		return p.bounded(b, ContentTypeForm, "the form body")
	}
	b, err := gojq.Marshal(v)
	if err != nil {
		return nil, "", fmt.Errorf("%s: encoding its output as JSON: %w", p.transformName, err)
	}
	return p.bounded(b, ContentTypeJSON, what)
}

// The Content-Type values Build sets most, shared by every request (a
// slice of one is full, so an Add copies it).
var sharedContentTypes = map[string][]string{
	ContentTypeJSON:                   {ContentTypeJSON},
	ContentTypeText:                   {ContentTypeText},
	ContentTypeForm:                   {ContentTypeForm},
	"application/json; charset=utf-8": {"application/json; charset=utf-8"},
}

// sharedValue is a Content-Type's shared value slice, or nil.
func (p *Pipeline) sharedValue(ctype string) []string {
	if ctype == p.contentType {
		return p.contentTypeValue
	}
	return sharedContentTypes[ctype]
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// bounded refuses a built body over max_body: a transform can make a body
// bigger than any the relay would take in.
func (p *Pipeline) bounded(b []byte, ctype, what string) ([]byte, string, error) {
	if p.maxBody > 0 && int64(len(b)) > p.maxBody {
		return nil, "", fmt.Errorf("%s is %d bytes, over max_body (%d bytes)", what, len(b), p.maxBody)
	}
	return b, ctype, nil
}
