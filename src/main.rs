fn main() {
    println!("percept");
}
