import Foundation
import Mustache

/// A JSON array of a payload, attributes or actor as a template sees it: a section iterates it
/// and the transforms apply (`{{#items}}…{{/items}}`, `{{count(items)}}`) as on an array, and
/// `{{items}}` prints it as JSON (was Swift's description: `["a", "b"]`, `[1.5, nil]`).
struct TemplateList: MustacheSequence, MustacheCustomRenderable, MustacheTransformable, MustacheParent {
    let items: [Any]
    let json: JSONValue

    /// An array has no names (without this, Mustache's reflection would show `items` and `json`).
    func child(named name: String) -> Any? { nil }

    func makeIterator() -> IndexingIterator<[Any]> { items.makeIterator() }
    var renderText: String { json.compactText }
    var isNull: Bool { false }
    func transform(_ name: String) -> Any? { items.transform(name) }
}

/// A JSON object as a template sees it: names are looked up in it (`{{payload.visit.city}}`) and
/// a section enters it, as with a dictionary, and `{{payload.visit}}` prints it as JSON.
struct TemplateObject: MustacheParent, MustacheCustomRenderable, MustacheTransformable {
    let fields: [String: Any]
    let json: JSONValue

    func child(named name: String) -> Any? { fields[name] }
    var renderText: String { json.compactText }
    var isNull: Bool { false }
    func transform(_ name: String) -> Any? { fields.transform(name) }
}

extension JSONValue {
    /// Compact JSON with sorted keys; a whole number prints as one, as `plain` renders it.
    var compactText: String {
        var out = ""
        write(into: &out)
        return out
    }

    private func write(into out: inout String) {
        switch self {
        case .string(let v): out += jsonQuoted(v)
        case .number(let v): out += v.isFinite ? "\(Self.printed(v))" : "null"
        case .bool(let v): out += v ? "true" : "false"
        case .null: out += "null"
        case .array(let v):
            out += "["
            for (index, item) in v.enumerated() {
                if index > 0 { out += "," }
                item.write(into: &out)
            }
            out += "]"
        case .object(let v):
            out += "{"
            for (index, key) in v.keys.sorted().enumerated() {
                if index > 0 { out += "," }
                out += jsonQuoted(key) + ":"
                v[key]!.write(into: &out)
            }
            out += "}"
        }
    }
}

/// A name of the context that holds other names (`{{recipient}}`, `{{event}}`, `{{links}}`, the
/// whole context as `{{.}}`) prints as compact JSON, as a payload's objects do; it printed Swift's
/// description of its storage (a trial: `["attributes": HeraldCore.TemplateObject(fields: …`).
extension Dictionary: @retroactive MustacheCustomRenderable where Key == String {
    public var renderText: String { TemplateJSON.text(of: self) }
    public var isNull: Bool { false }
}

enum TemplateJSON {
    /// `value` of a rendering context as compact JSON, keys sorted.
    static func text(of value: Any?) -> String {
        switch value {
        case nil, is NSNull: return "null"
        case let string as String: return jsonQuoted(string)
        case let bool as Bool: return bool ? "true" : "false"
        case let number as Int: return String(number)
        case let number as Double: return number.isFinite ? JSONValue.number(number).compactText : "null"
        case let object as TemplateObject: return object.json.compactText
        case let list as TemplateList: return list.json.compactText
        case let dictionary as [String: Any]:
            return "{" + dictionary.keys.sorted().map { jsonQuoted($0) + ":" + text(of: dictionary[$0]!) }.joined(separator: ",") + "}"
        case let array as [Any]: return "[" + array.map { text(of: $0) }.joined(separator: ",") + "]"
        default: return jsonQuoted(String(describing: value!))
        }
    }
}
