package shape

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/itchyny/gojq"
)

// CheckTransform parses and compiles a jq program, for the config
// adapter to refuse one that would never run; the error is jq's message,
// with the line and column of a syntax error in the program.
func CheckTransform(program string) error {
	_, err := compileJQ(program)
	return err
}

func compileJQ(program string) (*gojq.Code, error) {
	q, err := gojq.Parse(program)
	if err != nil {
		var pe *gojq.ParseError
		if errors.As(err, &pe) {
			line, col := position(program, pe.Offset-len(pe.Token))
			return nil, fmt.Errorf("jq: syntax error at line %d, column %d: %w", line, col, err)
		}
		return nil, fmt.Errorf("jq: syntax error: %w", err)
	}
	code, err := gojq.Compile(q)
	if err != nil {
		return nil, fmt.Errorf("jq: compile error: %w", err)
	}
	return code, nil
}

// position is the 1-based line and column (in bytes) of offset in s.
func position(s string, offset int) (line, col int) {
	offset = min(max(offset, 0), len(s))
	before := s[:offset]
	line = strings.Count(before, "\n") + 1
	col = offset - strings.LastIndexByte(before, '\n')
	return line, col
}

// decodeJSON reads a body as jq reads its input: one JSON value, numbers
// kept as json.Number so that an integer beyond 2^53 (an id, a phone
// number) comes out with every digit it went in with.
func decodeJSON(body []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("it is empty")
		}
		return nil, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("it holds more than one JSON value")
	}
	return v, nil
}

// errTimeout is a transform cut off by the attempt's timeout.
type errTimeout struct{ name string }

func (e *errTimeout) Error() string { return e.name + " timed out" }
func (*errTimeout) Unwrap() error   { return context.DeadlineExceeded }

// transform runs the program over the body and returns its single output
// value.
func (p *Pipeline) transform(ctx context.Context, body []byte) (v any, err error) {
	in, err := decodeJSON(body)
	if err != nil {
		return nil, fmt.Errorf("%s: the body is not JSON: %w", p.transformName, err)
	}
	// gojq is third-party code running on payloads: an event it chokes on
	// is that event's failure, not the relay's.
	defer func() {
		if r := recover(); r != nil {
			v, err = nil, fmt.Errorf("%s: jq failed on this input: %v", p.transformName, r)
		}
	}()
	iter := p.code.RunWithContext(ctx, in)
	out, n := any(nil), 0
	for n < 2 {
		next, ok := iter.Next()
		if !ok {
			break
		}
		if e, ok := next.(error); ok {
			if err := p.jqError(e); err != nil {
				return nil, err
			}
			break // halt: the program ends here, without an error
		}
		out, n = next, n+1
	}
	switch n {
	case 0:
		return nil, fmt.Errorf("%s produced no value: it must produce exactly one, the body", p.transformName)
	case 1:
		return out, nil
	}
	return nil, fmt.Errorf("%s produced more than one value: it must produce exactly one, the body", p.transformName)
}

// jqError words an error the program raised; nil for a plain halt.
func (p *Pipeline) jqError(e error) error {
	var halt *gojq.HaltError
	if errors.As(e, &halt) && halt.Value() == nil {
		return nil
	}
	switch {
	case errors.Is(e, context.DeadlineExceeded):
		return &errTimeout{name: p.transformName}
	case errors.Is(e, context.Canceled):
		return fmt.Errorf("%s stopped: %w", p.transformName, e)
	}
	msg := e.Error()
	// error(...) and halt_error say "error: ..." themselves; jq's own
	// errors (type errors and the like) get the same lead, as jq prints.
	var ve gojq.ValueError
	if !errors.As(e, &ve) {
		msg = "error: " + msg
	}
	return fmt.Errorf("%s: jq: %s", p.transformName, msg)
}
