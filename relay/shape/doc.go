// Package shape builds what one target receives for one event, for
// legacy services that expect their own shape of request.
//
// A Pipeline is compiled once per config load (the jq program parsed and
// compiled, the URL and header templates parsed, the secrets decoded) and
// then builds each attempt's request in this order:
//
//	documented_only -> transform (jq) -> body_format -> URL and headers
//	with {event.*} placeholders -> Standard Webhooks signature
//
// With none of these configured the request is the event as received:
// its bytes and Content-Type, untouched and not copied. The stored event
// never changes: every attempt is built afresh from it, so a replay after a
// config change gets the new shape.
//
// Build never sends anything, and none of its errors is temporary: an
// event it cannot shape for a target (a jq error, a payload value a header
// cannot carry) is that event's failure at that target alone, worded for
// last_error. A payload can never add a header nor change the URL's
// scheme, host or port: placeholder values are escaped in the URL and
// refused in a header when they hold a control character.
package shape
