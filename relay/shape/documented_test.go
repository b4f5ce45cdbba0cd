package shape

import (
	"testing"
)

func TestDocumentedOnly(t *testing.T) {
	cases := []struct {
		name string
		body string
		want string
	}{
		{"v2", okhiV2, `{"v2":{"address_verification_id":"ONYgUOybCU","verification_status":"verified","verification_mode":"first_time","user_id":"hbZ69KMuYB","location_id":"C0DTxgjRdn"}}`},
		{"v2 in progress: no status", okhiV2InProgress, `{"v2":{"address_verification_id":"ONYgUOybCU","verification_mode":"first_time","user_id":"hbZ69KMuYB","location_id":"C0DTxgjRdn"}}`},
		{"v2 with unknown values", `{"v2": {"verification_status": "new_status", "verification_mode": 7}}`, `{"v2":{"verification_status":"new_status","verification_mode":7}}`},
		{"v2 empty", `{"v2": {}, "x": 1}`, `{"v2":{}}`},
		{"v3", okhiV3, `{"event_type":"address_verification.completed","event_id":"01HZ3QK7V6J8N2W4X5Y6Z7A8B9","api_version":"v3","event_timestamp":1715677923,` +
			`"data":{"usage_types":["digital_verification"],` +
			`"user":{"id": "hbZ69KMuYB", "first_name": "Gift", "last_name": "Moore", "phone": "+2347012345678"},` +
			`"metadata":{"org_id": "iNjNabYBcK", "app_id": "NstCO4hXXX"},` +
			`"location":{"id": "C0DTxgjRdn", "formatted_address": "12 Ojijo Rd, Nairobi"},` +
			`"address_verification":{"id": "ONYgUOybCU", "status": "verified"}}}`},
		{"v3 without data", `{"event_id": "e1", "api_version": "v3", "other": [1]}`, `{"event_id":"e1","api_version":"v3"}`},
		{"v3 with data not an object", `{"event_id": "e1", "data": null}`, `{"event_id":"e1"}`},
		{"v3 with a v2 object drops it", `{"event_id": "e1", "v2": {"user_id": "u"}}`, `{"event_id":"e1"}`},
		{"v3 keeps a big timestamp exact", `{"api_version": "v3", "event_timestamp": 12345678901234567890}`, `{"api_version":"v3","event_timestamp":12345678901234567890}`},
		{"a key given twice counts by its last value", `{"v2": {"user_id": "first", "user_id": "last"}}`, `{"v2":{"user_id":"last"}}`},
		{"neither shape: nothing documented", `{"a": 1, "v2": "not an object"}`, `{}`},
		{"an empty object", `{}`, `{}`},
	}
	p := mustCompile(t, Spec{Okhi: true, DocumentedOnly: true})
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := build(t, p, input(c.body))
			if string(r.Body) != c.want {
				t.Errorf("body = %s\nwant   %s", r.Body, c.want)
			}
			if ct := r.Header.Get("Content-Type"); ct != ContentTypeJSON {
				t.Errorf("Content-Type = %q, want %q", ct, ContentTypeJSON)
			}
		})
	}
}

func TestDocumentedOnlyErrors(t *testing.T) {
	p := mustCompile(t, Spec{Okhi: true, DocumentedOnly: true})
	for body, want := range map[string]string{
		`not json`:   "documented_only: the body is not JSON",
		`{"v2": {}`:  "documented_only: the body is not JSON",
		``:           "documented_only: the body is not JSON",
		`["v2"]`:     "documented_only: the body is not a JSON object",
		`"a string"`: "documented_only: the body is not a JSON object",
	} {
		if got := buildErr(t, p, input(body)); got != want {
			t.Errorf("body %q: error = %q, want %q", body, got, want)
		}
	}
}

// documented_only comes first: the transform sees only what OkHi
// documents, and the placeholders still read the original body.
func TestDocumentedOnlyBeforeTransform(t *testing.T) {
	p := mustCompile(t, Spec{
		Okhi: true, DocumentedOnly: true,
		Transform: `{keys: (.v2 | keys), score: .v2.extra_undocumented.score}`,
		Headers:   header("X-Score", "{event.json.v2.extra_undocumented.score}"),
	})
	r := build(t, p, input(okhiV2))
	want := `{"keys":["address_verification_id","location_id","user_id","verification_mode","verification_status"],"score":null}`
	if string(r.Body) != want {
		t.Errorf("body = %s\nwant   %s", r.Body, want)
	}
	if got := r.Header.Get("X-Score"); got != "0.91" {
		t.Errorf("X-Score = %q, want 0.91 (from the original body)", got)
	}
}
