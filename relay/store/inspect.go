package store

// Listing limits of every store (ListPending, DeadLetters): a page is
// bounded so that one admin request cannot copy a million deliveries.
const (
	defaultListLimit = 100
	maxListLimit     = 1000
)

// ListLimit turns a caller's limit into the page size a store uses.
func ListLimit(limit int) int {
	switch {
	case limit <= 0:
		return defaultListLimit
	case limit > maxListLimit:
		return maxListLimit
	}
	return limit
}
