import Foundation
import Testing

@testable import HeraldCore

@Suite("RFC 3339 date-times (issue 8 item 10)")
struct RFC3339Tests {
    @Test("reads what the schema's format: date-time allows")
    func accepts() {
        #expect(RFC3339.date(from: "1970-01-01T00:00:00Z") == Date(timeIntervalSince1970: 0))
        #expect(RFC3339.date(from: "2026-11-21T10:00:00.250Z") == Date(timeIntervalSince1970: 1_795_255_200.25))
        #expect(RFC3339.date(from: "2026-11-21t11:00:00+01:00") == Date(timeIntervalSince1970: 1_795_255_200))
        // Offsets beyond Foundation's ±18:00, lower-case z, a year before 1000, 29 February.
        #expect(RFC3339.date(from: "1970-01-01T19:54:00+19:54") == Date(timeIntervalSince1970: 0))
        #expect(RFC3339.date(from: "1969-12-31T00:24:00-23:36z") == nil)
        #expect(RFC3339.date(from: "0536-09-16T02:57:23z") != nil)
        #expect(RFC3339.date(from: "2024-02-29T00:00:00Z") != nil)
    }

    @Test("refuses what is not a date-time")
    func refuses() {
        for text in [
            "", "2026-11-21", "2026-11-21T10:00:00", "2026-02-30T00:00:00Z", "2025-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z", "2026-11-21T24:00:00Z", "2026-11-21T10:00:00.Z", "2026-11-21T10:00:00+2:00",
            "2026-11-21T10:00:00Z ", "2026-11-21 10:00:00Z",
        ] {
            #expect(RFC3339.date(from: text) == nil, "\(text)")
        }
    }
}
