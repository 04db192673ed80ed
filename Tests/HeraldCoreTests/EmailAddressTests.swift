import Foundation
import HeraldCore
import Testing

/// Issue 8 item 9: addresses Herald can never send to are refused on the way in, with the reason.
@Suite struct EmailAddressTests {
    @Test(arguments: [
        "ada@example.org", "dr.bob@clinic.example", "a.b-c+tag@sub.clinic.example", "o'brien@example.ie",
        "x!#$%&'*+-/=?^_`{|}~@example.org", "user@xn--bcher-kva.example", "USER@EXAMPLE.ORG",
        "dr.müller@clinic.example", "用户@例子.广告", "ada@bücher.example", "ω@παράδειγμα.δοκιμή",
        String(repeating: "a", count: 64) + "@example.org",
        "a@" + String(repeating: "b", count: 63) + ".example",
    ])
    func accepts(address: String) throws {
        let parsed = try EmailAddress(address)
        #expect(parsed.description == address)
        #expect(parsed.isInternationalised == !address.unicodeScalars.allSatisfy(\.isASCII))
    }

    @Test(arguments: [
        ("dr.x@clinic..example", "the domain contains two dots in a row"),
        ("dr..x@clinic.example", "the part before the @ contains two dots in a row"),
        (".x@clinic.example", "the part before the @ starts or ends with a dot"),
        ("x.@clinic.example", "the part before the @ starts or ends with a dot"),
        ("x@.clinic.example", "the domain starts or ends with a dot"),
        ("x@clinic.example.", "the domain starts or ends with a dot"),
        ("", "it is empty"),
        ("clinic.example", "it has no @"),
        ("a@b@clinic.example", "it has more than one @"),
        ("\"a b\"@clinic.example", "the part before the @ contains \"\"\", which is not allowed"),
        ("a b@clinic.example", "the part before the @ contains a space, which is not allowed"),
        ("@clinic.example", "nothing comes before the @"),
        ("x@", "nothing comes after the @"),
        ("x@localhost", "the domain has no dot (a name such as clinic.example is needed)"),
        ("x@[192.0.2.1]", "address literals such as [192.0.2.1] are not accepted; use a domain name"),
        ("x@10.0.0.1", "the domain ends in a label of digits only"),
        ("x@clinic_1.example", "the domain contains \"_\", which is not allowed in a host name"),
        ("x@-clinic.example", "a label of the domain starts or ends with a hyphen"),
        ("x@clinic-.example", "a label of the domain starts or ends with a hyphen"),
        ("x\r\nBcc: y@clinic.example", "the part before the @ contains a control character, which is not allowed"),
        (
            "dr.m\u{00FC}ller\u{202E}@clinic.example",
            "the part before the @ contains an invisible formatting character, which is not allowed"
        ),
        ("x\u{00A0}y@clinic.example", "the part before the @ contains a space character, which is not allowed"),
        ("💌@clinic.example", "the part before the @ contains \"💌\", which is not allowed"),
        (String(repeating: "a", count: 65) + "@example.org", "the part before the @ is longer than 64 bytes"),
        (String(repeating: "ü", count: 33) + "@example.org", "the part before the @ is longer than 64 bytes"), // 66 bytes
        ("a@" + String(repeating: "b", count: 64) + ".example", "a label of the domain is longer than 63 bytes"),
        (
            "a@" + Array(repeating: String(repeating: "b", count: 60), count: 5).joined(separator: ".") + ".example",
            "the domain is longer than 253 bytes"
        ),
        (
            String(repeating: "a", count: 64) + "@" + Array(repeating: String(repeating: "b", count: 60), count: 3).joined(separator: ".")
                + ".example",
            "it is longer than 254 bytes"
        ),
    ])
    func refuses(address: String, reason: String) {
        let error = #expect(throws: EmailAddressError.self) { try EmailAddress(address) }
        #expect(error?.reason == reason, "\(address.debugDescription)")
    }

    @Test func normalisesToNFCAndTrims() throws {
        #expect(try EmailAddress(" dr.mu\u{0308}ller@clinic.example ").description == "dr.m\u{00FC}ller@clinic.example")
    }

    @Test func validationErrorNamesTheFieldAndSaysWhy() {
        let error = #expect(throws: ValidationError.self) { try Validate.emailAddress("dr.x@clinic..example", field: "email_from") }
        #expect(
            error
                == ValidationError(
                    field: "email_from",
                    message: "\"dr.x@clinic..example\" is not an email address Herald can send to: the domain contains two dots in a row."))
        #expect(throws: Never.self) { try Validate.emailAddress("dr.müller@clinic.example") }
    }
}
