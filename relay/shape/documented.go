package shape

import (
	"bytes"
	"errors"

	"github.com/tidwall/gjson"
)

// The fields OkHi documents (its v2 and v3 webhook pages); everything
// else in a payload is, in OkHi's words, to be deprecated.
var (
	documentedV2     = []string{"address_verification_id", "verification_status", "verification_mode", "user_id", "location_id"}
	documentedV3     = []string{"event_type", "event_id", "api_version", "event_timestamp"}
	documentedV3Data = []string{"usage_types", "user", "metadata", "location", "address_verification"}
	topLevel         = []string{"event_type", "event_id", "api_version", "event_timestamp", "data", "v2"}
)

// Indexes into a pick of topLevel.
const (
	topEventID    = 1
	topAPIVersion = 2
	topData       = 4
	topV2         = 5
)

// documented returns the fields of an OkHi body that OkHi documents, as
// JSON: each value's bytes as received (numbers stay exact), a missing
// field absent. A body with event_id or api_version is v3; otherwise one
// with a top-level v2 object is v2; anything else is read as v3, so that
// it keeps only what a v3 body would.
func documented(body []byte) ([]byte, error) {
	if !gjson.ValidBytes(body) {
		return nil, errors.New("documented_only: the body is not JSON")
	}
	root := gjson.ParseBytes(body)
	if !root.IsObject() {
		return nil, errors.New("documented_only: the body is not a JSON object")
	}
	top := pick(root, topLevel)
	out := bytes.NewBuffer(make([]byte, 0, len(body)))
	out.WriteByte('{')
	if v2 := top[topV2]; !top[topEventID].Exists() && !top[topAPIVersion].Exists() && v2.IsObject() {
		writeField(out, "v2", "")
		writeObject(out, v2, documentedV2)
	} else {
		for i, name := range documentedV3 {
			if v := top[i]; v.Exists() {
				writeField(out, name, v.Raw)
			}
		}
		if data := top[topData]; data.IsObject() {
			writeField(out, "data", "")
			writeObject(out, data, documentedV3Data)
		}
	}
	out.WriteByte('}')
	return out.Bytes(), nil
}

// pick returns the value of each name in obj (a zero Result where
// absent). A key given twice counts by its last value, as encoding/json
// and JavaScript's JSON.parse read it, so that what is kept is what the
// target would have read.
func pick(obj gjson.Result, names []string) []gjson.Result {
	vals := make([]gjson.Result, len(names))
	obj.ForEach(func(k, v gjson.Result) bool {
		for i, name := range names {
			if k.Str == name {
				vals[i] = v
				break
			}
		}
		return true
	})
	return vals
}

// writeField writes a member's name (after a comma unless it is the
// first) and raw, which may be empty for a value written next.
func writeField(out *bytes.Buffer, name, raw string) {
	if b := out.Bytes(); b[len(b)-1] != '{' {
		out.WriteByte(',')
	}
	out.WriteByte('"')
	out.WriteString(name) // the documented names need no escaping
	out.WriteString(`":`)
	out.WriteString(raw)
}

// writeObject writes the named members of obj as an object.
func writeObject(out *bytes.Buffer, obj gjson.Result, names []string) {
	out.WriteByte('{')
	for i, v := range pick(obj, names) {
		if v.Exists() {
			writeField(out, names[i], v.Raw)
		}
	}
	out.WriteByte('}')
}
