package shape

import (
	"fmt"
	"net/url"

	"github.com/itchyny/gojq"
)

// formBody encodes a top-level object as application/x-www-form-urlencoded:
// keys sorted, strings as they are, null empty, and every other value
// (numbers, booleans, nested objects and arrays) as its JSON text. what
// names the value for the error ("the body", "transform's output").
func formBody(v any, what string) ([]byte, error) {
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("body_format form needs a JSON object, and %s is %s", what, article(gojq.TypeOf(v)))
	}
	vals := make(url.Values, len(obj))
	for k, x := range obj {
		switch x := x.(type) {
		case string:
			vals[k] = []string{x}
		case nil:
			vals[k] = []string{""}
		default:
			b, err := gojq.Marshal(x)
			if err != nil {
				return nil, fmt.Errorf("body_format form: encoding the value of %q: %w", k, err)
			}
			vals[k] = []string{string(b)}
		}
	}
	// Encode sorts the keys.
	return []byte(vals.Encode()), nil
}

// article puts "a" or "an" before a jq type name.
func article(typ string) string {
	switch typ {
	case "array", "object":
		return "an " + typ
	case "null":
		return typ
	}
	return "a " + typ
}
