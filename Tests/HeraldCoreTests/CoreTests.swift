import Foundation
import Testing

@testable import HeraldCore

@Suite("SQL script splitting")
struct SQLScriptTests {
    @Test("splits at top-level semicolons and drops comments")
    func splits() {
        let script = """
            -- a comment; with a semicolon
            CREATE TABLE a (x text DEFAULT 'it''s; fine');
            /* block; comment */ CREATE TABLE "b;c" (y int);
            """
        #expect(
            SQLScript.statements(script) == [
                "CREATE TABLE a (x text DEFAULT 'it''s; fine')",
                "CREATE TABLE \"b;c\" (y int)",
            ])
    }

    @Test("keeps dollar-quoted bodies whole")
    func dollarQuotes() {
        let script = """
            CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;
            DO $body$ BEGIN PERFORM 1; END $body$;
            SELECT $1
            """
        let statements = SQLScript.statements(script)
        #expect(statements.count == 3)
        #expect(statements[0].hasSuffix("$$ SELECT 1; $$"))
        #expect(statements[1] == "DO $body$ BEGIN PERFORM 1; END $body$")
        #expect(statements[2] == "SELECT $1")
    }

    @Test("an empty script or one of comments has no statements")
    func empty() {
        #expect(SQLScript.statements("").isEmpty)
        #expect(SQLScript.statements("-- nothing\n  ;  ; /* */").isEmpty)
    }
}

@Suite("Validation")
struct ValidationTests {
    @Test(
        "emails",
        arguments: [
            ("a@b.co", true), ("first.last@clinic.example", true), ("no-at", false),
            ("two@@at.com", false), ("sp ace@x.com", false), ("a@nodot", false), ("@x.com", false),
        ])
    func emails(value: String, valid: Bool) {
        #expect(((try? Validate.emailAddress(value)) != nil) == valid)
    }

    @Test(
        "locales",
        arguments: [
            ("en", true), ("fr-CA", true), ("zh-Hant-TW", true), ("es-419", true), ("english", false), ("en_US", false), ("", false),
        ])
    func locales(value: String, valid: Bool) {
        #expect(((try? Validate.locale(value)) != nil) == valid)
    }

    @Test(
        "time zones",
        arguments: [
            ("Europe/Paris", true), ("UTC", true), ("America/Argentina/Buenos_Aires", true), ("Mars/Olympus", false), ("", false),
            // Foundation opens these, but they are not names of the tz database.
            ("UTC+2", false), ("GMT+0530", false), ("../etc/passwd", false), ("utc", false),
            // ICU's three-letter names, which Foundation opens and PostgreSQL does not know (or,
            // for IST, reads as another zone), and files of the database that are not zones.
            ("IST", false), ("CTT", false), ("PST", false), ("posixrules", false), ("zone.tab", false),
            // Names of the database that ICU's canonical list (Foundation's) leaves out.
            ("Asia/Kolkata", true), ("Etc/UTC", true), ("Etc/GMT-14", true), ("Etc/GMT+5", true), ("US/Pacific", true),
            ("EST5EDT", true), ("Asia/Saigon", true), ("Asia/Calcutta", true),
        ])
    func timezones(value: String, valid: Bool) {
        #expect(((try? Validate.timezone(value)) != nil) == valid)
    }

    @Test(
        "names: trimmed, not blank, one line",
        arguments: [
            ("  Ward 3 ", "Ward 3"), ("Évelyne O'Neil", "Évelyne O'Neil"), ("   ", nil), ("", nil), ("Evil\r\nBcc: x@y.example", nil),
            ("tab\there", nil), (String(repeating: "a", count: 201), nil),
        ])
    func names(value: String, kept: String?) {
        #expect((try? Validate.text(value, field: "name")) == kept)
    }

    @Test("keys and slugs")
    func keys() {
        #expect((try? Validate.key("internship-2026")) != nil)
        #expect((try? Validate.key("A")) == nil)
        #expect((try? Validate.key("-leading")) == nil)
        #expect((try? Validate.slug("acme-clinic")) != nil)
        #expect((try? Validate.slug("under_score")) == nil)
    }

    @Test("passwords need 12 characters")
    func passwords() {
        #expect((try? Validate.password("short")) == nil)
        #expect((try? Validate.password("twelve chars")) != nil)
    }

    @Test("permissions must come from the catalogue")
    func permissions() throws {
        #expect(try Validate.permissions(["users.read", "users.read", "audit.read"]) == [.usersRead, .auditRead])
        #expect(throws: ValidationError.self) { try Validate.permissions(["users.read", "root.everything"]) }
    }
}

@Suite("Page cursors")
struct PageCursorTests {
    @Test("round-trips with microsecond precision")
    func roundTrip() throws {
        let cursor = PageCursor(time: Date(timeIntervalSince1970: 1_795_259_776.123456), id: UUID())
        let decoded = try PageCursor(encoded: cursor.encoded)
        #expect(decoded == cursor)
        #expect(decoded.micros == 1_795_259_776_123_456)
    }

    @Test(
        "refuses what it did not make, and times PostgreSQL cannot hold (a trial's crafted cursors were 500s)",
        arguments: [
            "", "not-base64!", "eyJ4IjoxfQ", "eyJ0Ijo5MjIzMzcyMDM2ODU0Nzc1ODA3LCJpIjoiMDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwIn0",
            "eyJ0IjotOTIyMzM3MjAzNjg1NDc3NTgwOCwiaSI6IjAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMCJ9",
        ])
    func refuses(text: String) {
        #expect(throws: ValidationError.self) { try PageCursor(encoded: text) }
    }

    @Test("page sizes stay within 1...200")
    func sizes() throws {
        #expect(try PageSize.clamp(nil) == 50)
        #expect(try PageSize.clamp(200) == 200)
        #expect(throws: ValidationError.self) { try PageSize.clamp(0) }
        #expect(throws: ValidationError.self) { try PageSize.clamp(201) }
    }
}

@Suite("Login attempt limiter")
struct AttemptLimiterTests {
    @Test("blocks after the limit within the window, frees after it")
    func window() {
        var limiter = AttemptLimiter(limit: 3, window: 60)
        let start = Date(timeIntervalSince1970: 1_000)
        for i in 0..<3 {
            #expect(limiter.retryAfter("k", now: start.addingTimeInterval(Double(i))) == nil)
            limiter.record("k", now: start.addingTimeInterval(Double(i)))
        }
        let wait = limiter.retryAfter("k", now: start.addingTimeInterval(10))
        #expect(wait == 50)
        #expect(limiter.retryAfter("other", now: start.addingTimeInterval(10)) == nil)
        #expect(limiter.retryAfter("k", now: start.addingTimeInterval(61)) == nil)
    }

    @Test("a success resets the account")
    func reset() {
        var limiter = AttemptLimiter(limit: 1, window: 60)
        let now = Date()
        limiter.record("k", now: now)
        #expect(limiter.retryAfter("k", now: now) != nil)
        limiter.reset("k")
        #expect(limiter.retryAfter("k", now: now) == nil)
    }
}

@Suite("Built-in roles")
struct BuiltinRoleTests {
    @Test("owner holds everything; admin everything but the organisation's settings")
    func ownerAndAdmin() {
        #expect(BuiltinRole.owner.permissions == Set(Permission.allCases))
        #expect(BuiltinRole.admin.permissions == Set(Permission.allCases).subtracting([.organisationManage]))
    }

    @Test("members read their own feed and nothing administrative")
    func member() {
        #expect(BuiltinRole.member.permissions == [.notificationsRead, .preferencesManage])
    }
}

@Suite("JSON string literals")
struct JSONQuotedTests {
    @Test("jsonQuoted writes JSONEncoder's bytes (slashes unescaped) for awkward strings")
    func sameAsEncoder() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.withoutEscapingSlashes]
        let control = (0..<0x20).map { String(UnicodeScalar(UInt8($0))) }.joined()
        for value in ["", "plain", "a/b", "quote \" backslash \\", control + "\u{7F}", "Ünïcödé 東京 🦷 \u{2028}\u{2029}"] {
            #expect(jsonQuoted(value) == String(decoding: try encoder.encode(value), as: UTF8.self))
        }
    }
}

@Suite("Base64url")
struct Base64URLTests {
    @Test("decodes what Foundation's base64 decodes, with and without padding, in either alphabet")
    func matchesFoundation() {
        var generator = SystemRandomNumberGenerator()
        for length in 0..<70 {
            let data = Data((0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) })
            let standard = data.base64EncodedString()
            #expect(Data(base64URLEncoded: data.base64URLEncoded) == data, "\(length)")
            #expect(Data(base64URLEncoded: standard) == data, "padded, standard alphabet: \(length)")
        }
        #expect(Data(base64URLEncoded: "-_-_") == Data(base64Encoded: "+/+/"))
        #expect(Data(base64URLEncoded: "QQ") == Data("A".utf8))
        #expect(Data(base64URLEncoded: "QQ=") == Data("A".utf8))
        // The encoder writes Foundation's base64 in the URL alphabet, unpadded.
        for length in 0..<70 {
            let data = Data((0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) })
            let foundation = data.base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
                .replacingOccurrences(of: "=", with: "")
            #expect(data.base64URLEncoded == foundation, "\(length)")
        }
    }

    @Test("a UUID's text forms are uuidString's, in either case")
    func uuidText() {
        for uuid in [
            UUID(), UUID(), UUID(uuid: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
            UUID(uuidString: "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF")!,
        ] {
            #expect(uuid.uppercased == uuid.uuidString)
            #expect(uuid.lowercased == uuid.uuidString.lowercased())
        }
    }

    @Test("refuses other characters and impossible lengths", arguments: ["Q", "QUJDR", "QU JD", "QU.D", "QQ===", "QU=D", "é"])
    func refuses(_ text: String) {
        #expect(Data(base64URLEncoded: text) == nil)
    }
}
