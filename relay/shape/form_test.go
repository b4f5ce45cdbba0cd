package shape

import (
	"net/url"
	"testing"
)

func TestForm(t *testing.T) {
	cases := []struct {
		name      string
		transform string
		body      string
		want      string
	}{
		{"strings as they are, keys sorted", "", `{"z": "last", "a": "first", "m": "a b&c=d/é"}`, "a=first&m=a+b%26c%3Dd%2F%C3%A9&z=last"},
		{"numbers and booleans as JSON writes them", "", `{"n": 1.50, "i": -3, "t": true, "f": false, "big": 12345678901234567890}`,
			"big=12345678901234567890&f=false&i=-3&n=1.50&t=true"},
		{"null as an empty value", "", `{"gone": null, "here": "x"}`, "gone=&here=x"},
		{"nested values as their JSON text", "", `{"obj": {"b": 1, "a": [true, null]}, "arr": ["x", {"y": "<z>"}]}`,
			"arr=" + url.QueryEscape(`["x",{"y":"<z>"}]`) + "&obj=" + url.QueryEscape(`{"a":[true,null],"b":1}`)},
		{"an empty object", "", `{}`, ""},
		{"of a transform", `{id: .v2.user_id, status: .v2.verification_status, at: 1.5 * 2, none: .v2.nothing}`, okhiV2,
			"at=3&id=hbZ69KMuYB&none=&status=verified"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := build(t, mustCompile(t, Spec{Transform: c.transform, Form: true}), input(c.body))
			if string(r.Body) != c.want {
				t.Errorf("body = %s\nwant   %s", r.Body, c.want)
			}
			if ct := r.Header.Get("Content-Type"); ct != ContentTypeForm {
				t.Errorf("Content-Type = %q, want %q", ct, ContentTypeForm)
			}
			if _, err := url.ParseQuery(string(r.Body)); err != nil {
				t.Errorf("body does not parse as a form: %v", err)
			}
		})
	}
}

func TestFormErrors(t *testing.T) {
	cases := []struct {
		name      string
		transform string
		body      string
		want      string
	}{
		{"an array body", "", `[1, 2]`, "body_format form needs a JSON object, and the body is an array"},
		{"a number body", "", `3`, "body_format form needs a JSON object, and the body is a number"},
		{"a null body", "", `null`, "body_format form needs a JSON object, and the body is null"},
		{"a body that is not JSON", "", `a=1&b=2`, "body_format form: the body is not JSON: invalid character 'a' looking for beginning of value"},
		{"a transform's string", `.v2.user_id`, okhiV2, "body_format form needs a JSON object, and transform's output is a string"},
		{"a transform's array", `[.v2.user_id]`, okhiV2, "body_format form needs a JSON object, and transform's output is an array"},
		{"a transform's boolean", `true`, okhiV2, "body_format form needs a JSON object, and transform's output is a boolean"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := buildErr(t, mustCompile(t, Spec{Transform: c.transform, Form: true}), input(c.body)); got != c.want {
				t.Errorf("error = %q\nwant    %q", got, c.want)
			}
		})
	}
}
